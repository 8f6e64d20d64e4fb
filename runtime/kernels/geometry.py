"""Window geometry shared by the conv, pooling and sparse kernels' wrappers."""


def out_size(size: int, k: int, stride: int, pad: int) -> int:
    """Output length of a convolution or pooling window along one axis."""
    return (size + 2 * pad - k) // stride + 1


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)
