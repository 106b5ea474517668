"""Test pictures shared by the Hugging Face and GlimpsePrune tests (not a test module)."""
import numpy as np


def picture(seed, h, w):
    """Blocky random picture: regions of colour give the encoder something to attend to."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rng.integers(3, 7), rng.integers(3, 7), 3)).astype(np.uint8)
    im = Image.fromarray(blocks).resize((w, h), Image.NEAREST)
    arr = np.asarray(im).astype(np.int16) + rng.integers(-20, 20, size=(h, w, 1))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))
