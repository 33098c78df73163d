"""The FX graphs dynamo hands a backend for a call: what the pass tests rewrite."""
import torch


def dynamo_graphs(fn, *args):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(fn, backend=capture)(*args)
    return graphs
