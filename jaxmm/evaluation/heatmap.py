"""A Grad-CAM map drawn over its photo, the same way in figures and in the server's PNG.

Importing this module is cheap (NumPy, Pillow; matplotlib's colour maps on first use): the
server draws overlays without jax or flax.
"""

import numpy as np
from PIL import Image

COLORMAP = "jet"
OPACITY = 0.6  # the opacity of the hottest location; it follows the heat below


def upsample(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a [h,w] map to ``size`` = (H, W), for overlaying on the image."""
    resized = Image.fromarray(np.asarray(heatmap, np.float32), mode="F").resize(
        (size[1], size[0]), Image.BILINEAR)
    return np.asarray(resized)


def heat_rgba(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Float RGBA [H,W,4] of a [h,w] map in [0,1] resized to ``size``: the colour map's colour,
    with an opacity that follows the heat, so cold regions leave the photo as it is."""
    import matplotlib

    heat = np.clip(upsample(heatmap, size), 0.0, 1.0)
    rgba = matplotlib.colormaps[COLORMAP](heat)
    rgba[..., 3] = OPACITY * heat
    return rgba


def overlay(image: np.ndarray, heatmap: np.ndarray, min_side: int = 224) -> Image.Image:
    """The photo (uint8 [H,W,3]) with the map blended over it, enlarged (bicubic) to at least
    ``min_side`` pixels a side so that a small model input stays visible."""
    photo = Image.fromarray(np.asarray(image, np.uint8))
    scale = max(1, -(-min_side // min(photo.size)))
    photo = photo.resize((photo.width * scale, photo.height * scale), Image.BICUBIC)
    rgba = heat_rgba(heatmap, (photo.height, photo.width))
    alpha = rgba[..., 3:]
    blended = np.asarray(photo, np.float64) / 255 * (1 - alpha) + rgba[..., :3] * alpha
    return Image.fromarray(np.round(blended * 255).astype(np.uint8))
