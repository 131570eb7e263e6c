"""The one table of test tolerances: (atol, rtol) per input dtype, against a float64 reference."""
import torch

# Values in the input dtype (z, gradients): dominated by the dtype's rounding of the output.
VALUE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (5e-5, 1e-5),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (3e-2, 1.6e-2),
}

# float32 sums (KL per sample and its reductions): fp32 accumulation error grows with the row length.
SUM = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 2e-5),
    torch.float16: (1e-4, 2e-5),
    torch.bfloat16: (1e-4, 2e-5),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, table=VALUE, scale: float = 1.0):
    atol, rtol = table[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol, equal_nan=True)
