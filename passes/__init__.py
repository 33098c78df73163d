"""kvfx graph passes: find attention sites and their cache writes in a dynamo FX graph and
rewrite them into `torch.ops.kvfx.*` ops. Passes never print: they return what they matched,
rewrote and skipped (with reasons), and `kvfx.report` shows it."""
