"""CIFAR-10-C's corruptions at their own strength, and the official CIFAR-10-C files.

Hendrycks & Dietterich (ICLR 2019) corrupted the CIFAR-10 test set with 15 benchmark corruptions and
4 held-out ones, each at five severities, with constants chosen for 32 x 32 images (ImageNet-C's,
made for 224 pixels, are two to four times stronger). The constants below are those of the paper's
CIFAR-10 generator; the code is this project's own, drawn from a seeded generator (one seed, one
array) and vectorised over the batch where the operation allows. Where the generator used
ImageMagick's motion blur (motion blur, snow), `motion_kernel_blur` computes the same one-sided
Gaussian line kernel (tests/test_corruptions.py measures it against ImageMagick).

The draws are this tool's own, not the released files: `read_official` reads those (one .npy per
corruption holding 5 x 10,000 images in severity order, and labels.npy) when a user has them.
"""

from __future__ import annotations

import functools
import importlib.util
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from .cifar import CLASSES, DataError, Dataset, validate

BENCHMARK = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
HELD_OUT = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)
SIZE = 32

Corruption = Callable[[np.ndarray, object, np.random.Generator], np.ndarray]
_CORRUPTIONS: dict[str, tuple[Corruption, tuple]] = {}


def _corruption(*constants: object) -> Callable[[Corruption], Corruption]:
    """Register a corruption with its five severities' constants.

    It maps N x 32 x 32 x 3 floats in [0, 1] to floats (clipped to [0, 1] afterwards) and draws only
    from the generator it is given.
    """

    def register(f: Corruption) -> Corruption:
        _CORRUPTIONS[f.__name__] = (f, constants)
        return f

    return register


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """N x 32 x 32 x 3 uint8 images under corruption `name` at `severity` (1-5); one seed gives one
    array."""
    if name not in _CORRUPTIONS:
        raise ValueError(
            f"unknown corruption {name!r}: one of {', '.join((*BENCHMARK, *HELD_OUT))}"
        )
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity}: must be one of 1-5")
    f, constants = _CORRUPTIONS[name]
    out = f(images.astype(np.float64) / 255.0, constants[severity - 1], np.random.default_rng(seed))
    if out.dtype == np.uint8:  # already 8-bit levels (PIL operations, ImageMagick's rounding)
        return out
    # the generator stored np.uint8(clip(x) * 255): truncation, not rounding
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def available() -> tuple[str, ...]:
    """The corruptions this installation can compute: frost needs the pictures `imagecorruptions`
    ships."""
    return tuple(n for n in (*BENCHMARK, *HELD_OUT) if n != "frost" or _frost_dir() is not None)


# ---- noise ----


@_corruption(0.04, 0.06, 0.08, 0.09, 0.10)
def gaussian_noise(x, sigma, rng):
    return x + rng.normal(scale=sigma, size=x.shape)


@_corruption(500, 250, 100, 75, 50)
def shot_noise(x, photons, rng):
    return rng.poisson(x * photons) / photons


@_corruption(0.01, 0.02, 0.03, 0.05, 0.07)
def impulse_noise(x, amount, rng):
    """Salt and pepper on each value independently, half of each (scikit-image's
    `random_noise(mode="s&p")`)."""
    flipped = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    return np.where(flipped, salt.astype(x.dtype), x)


@_corruption(0.06, 0.10, 0.12, 0.16, 0.20)
def speckle_noise(x, sigma, rng):
    return x + x * rng.normal(scale=sigma, size=x.shape)


# ---- blur ----


def _gaussian(
    x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0
) -> np.ndarray:
    """Scikit-image's `gaussian` on a batch of images: no blur across images or channels."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, sigma=(0, sigma, sigma, 0)[: x.ndim], mode=mode, truncate=truncate)


@_corruption(0.4, 0.6, 0.7, 0.8, 1.0)
def gaussian_blur(x, sigma, rng):
    return _gaussian(x, sigma)


@_corruption((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))
def glass_blur(x, c, rng):
    """Blur, then move pixels locally (bottom-right to top-left), then blur again.

    The generator meant to swap each pixel with a neighbour, but its tuple assignment of numpy views
    copies the neighbour over the pixel and leaves the neighbour as it was; the released files hold
    that, so it is kept.
    """
    sigma, delta, iterations = c
    x = (_gaussian(x, sigma) * 255).astype(np.uint8)
    n = np.arange(len(x))
    for _ in range(iterations):
        for h in range(SIZE - delta, delta, -1):
            for w in range(SIZE - delta, delta, -1):
                # as numpy's randint: `delta` excluded
                dx, dy = rng.integers(-delta, delta, size=(2, len(x)))
                x[n, h, w] = x[n, h + dy, w + dx]
    return _gaussian(x / 255.0, sigma)


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    import cv2

    side = np.arange(-8, 9)
    xx, yy = np.meshgrid(side, side)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
    return cv2.GaussianBlur(disk / disk.sum(), ksize=(3, 3), sigmaX=alias_blur)  # antialiased edge


@_corruption((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))
def defocus_blur(x, c, rng):
    from scipy.ndimage import correlate

    kernel = _disk(*c)
    used = np.flatnonzero(kernel.sum(axis=0) > 0)  # the disk is small: correlate only its support
    kernel = kernel[used[0] : used[-1] + 1, used[0] : used[-1] + 1][None, :, :, None]
    return correlate(x.astype(np.float32), kernel, mode="mirror")  # mirror: OpenCV's default border


def motion_kernel_blur(
    x: np.ndarray, radius: float, sigma: float, angles: np.ndarray
) -> np.ndarray:
    """ImageMagick's motion blur, per image: a one-sided Gaussian (width 2 * radius + 1) along
    `angle` degrees, each tap at the nearest pixel, the edge pixel repeated past the border;
    truncated to 8-bit levels, as ImageMagick's 16-bit result written to an 8-bit PNG is (measured
    against it: tests/test_corruptions.py)."""
    width = int(2 * np.ceil(radius) + 1)
    weights = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2))
    weights /= weights.sum()
    rows, cols = np.arange(SIZE)[:, None], np.arange(SIZE)[None, :]
    out = np.zeros_like(x)
    for i, angle in enumerate(np.deg2rad(angles)):
        for tap, weight in enumerate(weights):
            dx, dy = (
                int(np.ceil(tap * np.cos(angle) - 0.5)),
                int(np.ceil(tap * np.sin(angle) - 0.5)),
            )
            out[i] += (
                weight * x[i, np.clip(rows + dy, 0, SIZE - 1), np.clip(cols + dx, 0, SIZE - 1)]
            )
    return np.floor(out * 255 + 1e-6) / 255


@_corruption((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))
def motion_blur(x, c, rng):
    return (
        (motion_kernel_blur(x, *c, rng.uniform(-45, 45, size=len(x))) * 255)
        .round()
        .astype(np.uint8)
    )


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """n_out x n_in weights of linear interpolation with the end points aligned (scipy.ndimage.zoom,
    order 1)."""
    where = np.arange(n_out) * (n_in - 1) / max(n_out - 1, 1)
    left = np.minimum(np.floor(where).astype(int), n_in - 2)
    weights = np.zeros((n_out, n_in))
    weights[np.arange(n_out), left] = 1 - (where - left)
    weights[np.arange(n_out), left + 1] = where - left
    return weights


def _clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom the centre of a batch of images (N x H x W x C) by `factor`, keeping H x W: scipy's
    `zoom` at order 1, computed as two matrix products (separable), which is 40 times faster on a
    batch."""
    h = x.shape[1]
    crop = int(np.ceil(h / factor))
    top = (h - crop) // 2
    size = round(crop * factor)
    resize = _resize_matrix(crop, size)
    trim = (size - h) // 2
    resize = resize[trim : trim + h]
    planes = np.moveaxis(x[:, top : top + crop, top : top + crop], -1, 1)  # N x C x crop x crop
    return np.moveaxis(resize @ planes @ resize.T, 1, -1)


@_corruption(*(np.arange(1, top, 0.01) for top in (1.06, 1.11, 1.16, 1.21, 1.26)))
def zoom_blur(x, factors, rng):
    x = x.astype(np.float32)
    return (x + sum(_clipped_zoom(x, f) for f in factors)) / (len(factors) + 1)


# ---- weather ----


@_corruption(
    (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
    (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
    (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
    (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
    (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
)
def snow(x, c, rng):
    """Flakes: zoomed Gaussian noise above a threshold, motion-blurred, added twice (once rotated
    180 degrees) onto the image brightened towards grey."""
    mean, std, zoom, threshold, radius, sigma, keep = c
    x = x.astype(np.float32)
    layer = _clipped_zoom(rng.normal(mean, std, size=(len(x), SIZE, SIZE, 1)), zoom)
    layer[layer < threshold] = 0
    layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8) / 255.0  # an 8-bit greyscale picture
    layer = motion_kernel_blur(layer, radius, sigma, rng.uniform(-135, -45, size=len(x)))
    grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = keep * x + (1 - keep) * np.maximum(x, grey[..., None] * 1.5 + 0.5)
    return x + layer + np.rot90(layer, k=2, axes=(1, 2))


def _frost_dir() -> Path | None:
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0]) / "frost"
    return folder if folder.is_dir() else None


@functools.cache
def _frost_pictures() -> tuple[np.ndarray, ...]:
    """The first five of the frost photographs, at a fifth of their size (as the generator used
    them)."""
    import cv2

    folder = _frost_dir()
    if folder is None:
        raise DataError(
            "frost needs the pictures of the imagecorruptions package: pip install "
            "'cifar-transfer[analysis]'"
        )
    names = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
    pictures = [cv2.imread(str(folder / n))[..., ::-1] for n in names]  # BGR -> RGB
    return tuple(cv2.resize(p, (0, 0), fx=0.2, fy=0.2).astype(np.float64) / 255.0 for p in pictures)


@_corruption((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))
def frost(x, c, rng):
    pictures = _frost_pictures()
    out = np.empty_like(x)
    for i, which in enumerate(rng.integers(0, len(pictures), size=len(x))):
        p = pictures[which]
        top, left = rng.integers(0, p.shape[0] - SIZE), rng.integers(0, p.shape[1] - SIZE)
        out[i] = c[0] * x[i] + c[1] * p[top : top + SIZE, left : left + SIZE]
    return out


def plasma_fractal(rng: np.random.Generator, n: int, decay: float, size: int = SIZE) -> np.ndarray:
    """N height maps in [0, 1] by the diamond-square algorithm (the fog of ImageNet-C and
    CIFAR-10-C)."""
    heights = np.zeros((n, size, size))
    step, wibble = size, 100.0

    def wibbled(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = heights[:, 0:size:step, 0:size:step]  # squares: each centre from its four corners
        square = corners + np.roll(corners, -1, axis=1)
        heights[:, half:size:step, half:size:step] = wibbled(square + np.roll(square, -1, axis=2))
        # diamonds: each edge midpoint from its four
        centres = heights[:, half:size:step, half:size:step]
        corners = heights[:, 0:size:step, 0:size:step]
        left = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        heights[:, 0:size:step, half:size:step] = wibbled(left)
        top = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        heights[:, half:size:step, 0:size:step] = wibbled(top)
        step //= 2
        wibble /= decay
    heights -= heights.min(axis=(1, 2), keepdims=True)
    return heights / heights.max(axis=(1, 2), keepdims=True)


@_corruption((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))
def fog(x, c, rng):
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    x = x + c[0] * plasma_fractal(rng, len(x), c[1])[..., None]
    return x * peak / (peak + c[0])


@_corruption(
    (0.62, 0.1, 0.7, 0.7, 0.5, 0),
    (0.65, 0.1, 0.8, 0.7, 0.5, 0),
    (0.65, 0.3, 1, 0.69, 0.5, 0),
    (0.65, 0.1, 0.7, 0.69, 0.6, 1),
    (0.65, 0.1, 0.5, 0.68, 0.6, 1),
)
def spatter(x, c, rng):
    """Water (severities 1-3) or mud (4-5) splashed from thresholded, blurred noise."""
    mean, std, sigma, threshold, strength, mud = c
    liquid = _gaussian(rng.normal(mean, std, size=x.shape[:3]), sigma)
    liquid[liquid < threshold] = 0
    if mud:
        m = _gaussian((liquid > threshold).astype(np.float32), strength)
        m[m < 0.8] = 0
        brown = np.array([63, 42, 20]) / 255.0
        return x * (1 - m[..., None]) + brown * m[..., None]
    return np.stack([_water(im.astype(np.float32), lq, strength) for im, lq in zip(x, liquid)])


def _water(x: np.ndarray, liquid: np.ndarray, strength: float) -> np.ndarray:
    """Pale turquoise drops whose edges are found with Canny and shaded by their distance to the
    edge."""
    import cv2

    liquid = (liquid * 255).astype(np.uint8)
    dist = cv2.distanceTransform(255 - cv2.Canny(liquid, 50, 150), cv2.DIST_L2, 5)
    _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
    dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
    dist = cv2.filter2D(dist, cv2.CV_8U, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]))
    dist = cv2.blur(dist, (3, 3)).astype(np.float32)
    m = np.repeat((liquid * dist)[..., None], 3, axis=2)  # the generator's uint8 x float32 product
    m = m / np.max(m, axis=(0, 1)) * strength
    colour = np.array([175, 238, 238], dtype=np.float32) / 255.0
    return np.clip(x + m * colour, 0, 1)


# ---- digital ----


@_corruption(0.05, 0.1, 0.15, 0.2, 0.3)
def brightness(x, shift, rng):
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    hsv = rgb_to_hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + shift, 0, 1)
    return hsv_to_rgb(hsv)


@_corruption((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))
def saturate(x, c, rng):
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    hsv = rgb_to_hsv(x)
    hsv[..., 1] = np.clip(hsv[..., 1] * c[0] + c[1], 0, 1)
    return hsv_to_rgb(hsv)


@_corruption(0.75, 0.5, 0.4, 0.3, 0.15)
def contrast(x, factor, rng):
    means = x.mean(axis=(1, 2), keepdims=True)  # per image and channel
    return (x - means) * factor + means


def _through_pil(x: np.ndarray, f: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """A PIL operation on each image, as 8-bit images in and out."""
    images = (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
    return np.stack([np.asarray(f(Image.fromarray(im)), dtype=np.uint8) for im in images])


@_corruption(80, 65, 58, 50, 40)
def jpeg_compression(x, quality, rng):
    def jpeg(im: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        im.save(buffer, "JPEG", quality=quality)
        return Image.open(buffer)

    return _through_pil(x, jpeg)


@_corruption(0.95, 0.9, 0.85, 0.75, 0.65)
def pixelate(x, scale, rng):
    small = int(SIZE * scale)
    return _through_pil(
        x, lambda im: im.resize((small, small), Image.BOX).resize((SIZE, SIZE), Image.BOX)
    )


@_corruption(
    *(
        (SIZE * a, SIZE * s, SIZE * d)
        for a, s, d in [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06)]
    ),
    *((SIZE * a, SIZE * s, SIZE * d) for a, s, d in [(0.1, 0.04, 0.05), (0.1, 0.03, 0.03)]),
)
def elastic_transform(x, c, rng):
    """A random affine warp of three points, then a smooth random displacement field."""
    import cv2
    from scipy.ndimage import gaussian_filter, map_coordinates

    alpha, sigma, shift = c
    centre, half = np.float32([SIZE // 2, SIZE // 2]), SIZE // 3
    points = np.float32([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    out = np.empty_like(x, dtype=np.float32)
    ys, xs, zs = np.meshgrid(np.arange(SIZE), np.arange(SIZE), np.arange(3), indexing="ij")
    for i, image in enumerate(x.astype(np.float32)):
        moved = points + rng.uniform(-shift, shift, size=points.shape).astype(np.float32)
        image = cv2.warpAffine(
            image,
            cv2.getAffineTransform(points, moved),
            (SIZE, SIZE),
            borderMode=cv2.BORDER_REFLECT_101,
        )
        dx, dy = (
            gaussian_filter(
                rng.uniform(-1, 1, size=(SIZE, SIZE)), sigma, mode="reflect", truncate=3
            )
            * alpha
            for _ in range(2)
        )
        coords = (ys + dy[..., None]).ravel(), (xs + dx[..., None]).ravel(), zs.ravel()
        out[i] = map_coordinates(image, coords, order=1, mode="reflect").reshape(image.shape)
    return out


# ---- the released files ----


def is_official_folder(folder: Path) -> bool:
    """A folder in the released layout; one that cannot be looked into is not (the photo-folder
    reader names it)."""
    try:
        labels = (folder / "labels.npy").is_file()
        return labels and any((folder / f"{n}.npy").is_file() for n in (*BENCHMARK, *HELD_OUT))
    except OSError:  # e.g. a folder without read permission
        return False


def read_official(folder: Path) -> Iterator[tuple[str, int, Dataset]]:
    """The released CIFAR-10-C (or a folder in its layout), one corruption and severity at a time:
    each .npy holds 5 blocks of images in severity order, `labels.npy` their labels.

    Read through a memory map, so the 2.9 GB of the full release never sit in memory at once.
    """
    labels = _read_labels(folder / "labels.npy")
    found = [n for n in (*BENCHMARK, *HELD_OUT) if (folder / f"{n}.npy").is_file()]
    if not found:
        raise DataError(
            f"{folder}: no CIFAR-10-C files ({', '.join(f'{n}.npy' for n in BENCHMARK[:3])}, ...)"
        )
    for name in found:
        images = _load_npy(folder / f"{name}.npy", mmap=True)
        if len(images) != len(labels) or len(images) % len(SEVERITIES):
            raise DataError(
                f"{folder / name}.npy: {len(images)} images for {len(labels)} labels; expected 5 "
                "equal blocks"
            )
        block = len(images) // len(SEVERITIES)
        for s in SEVERITIES:
            part = slice((s - 1) * block, s * block)
            yield (
                name,
                s,
                validate(np.array(images[part]), labels[part], str(folder / f"{name}.npy")),
            )


def _read_labels(path: Path) -> np.ndarray:
    """labels.npy, checked before any value is read or converted: a 1-D integer array of class
    indices (a float, bool or structured array would be truncated or zeroed without a word).

    Read through a memory map, so a header that claims more labels than the file holds is refused
    without allocating them.
    """
    labels = _load_npy(path, mmap=True)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(
            f"{path}: labels must be a 1-D integer array, got shape {labels.shape} dtype "
            f"{labels.dtype}"
        )
    if len(labels) == 0:
        raise DataError(f"{path}: holds no labels")
    labels = np.array(labels, dtype=np.int64)
    if labels.min() < 0 or labels.max() >= len(CLASSES):
        raise DataError(
            f"{path}: labels must be in 0..{len(CLASSES) - 1}, found {labels.min()}..{labels.max()}"
        )
    return labels


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # EOFError: an empty file
        raise DataError(f"{path}: not a readable .npy file ({e or 'empty'})") from None
