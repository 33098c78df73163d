"""Small random-weight models written the way popular codebases write them (gpt-fast, nanoGPT),
so the compile path is tested on caches and attention that HF does not produce."""
