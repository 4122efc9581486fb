"""Logit soft-capping (Gemma 2): ``c * tanh(s / c)``, as a Triton helper."""

from ._triton import tl, triton


@triton.jit
def tanh(x):
    # libdevice.tanh cannot run under TRITON_INTERPRET, so build tanh from exp. Away from 0
    # (1 - e^-2|x|) / (1 + e^-2|x|) is accurate; near 0 the numerator cancels and, since the
    # result is multiplied by the cap (e.g. 50), that would cost ~1e-5 absolute in the logits,
    # so use the odd Taylor series there (truncation error < 1e-9 relative for |x| < 0.25).
    ax = tl.abs(x)
    t = tl.exp(-2.0 * ax)
    far = (1.0 - t) / (1.0 + t)
    x2 = ax * ax
    near = ax * (
        1.0
        + x2
        * (
            -0.3333333333333333
            + x2
            * (
                0.13333333333333333
                + x2 * (-0.05396825396825397 + x2 * (0.021869488536155203 + x2 * -0.008863235529902197))
            )
        )
    )
    y = tl.where(ax < 0.25, near, far)
    return tl.where(x < 0.0, -y, y)
