"""Run 2-rank under torchrun by tests/test_torchrun.py, many times: every run must exit 0.

The last statement is a collective, so the interpreter starts finalizing right after it
(the SIGABRT at exit happened when gloo's worker thread still held that collective's work).
"""

import torch

import fsharding as fs

mesh = fs.Mesh(dp=2)  # the process group from torchrun's environment
f = fs.shard(lambda x: fs.psum(x.sum(), "dp"), mesh=mesh, in_specs=fs.P("dp"), out_specs=fs.P())
g = fs.shard(
    lambda x: x * fs.axis_index("dp"), mesh=mesh, in_specs=fs.P("dp"), out_specs=fs.P("dp")
)
assert f(torch.arange(4.0)).item() == 6.0
assert g(torch.ones(4)).tolist() == [0.0, 0.0, 1.0, 1.0]
y = f(torch.arange(4.0))
