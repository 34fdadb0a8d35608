"""`ovqvae encode` and `ovqvae decode`: a folder of images to adaptive-length codes and back,
through a SavedModel's `encode_to_quality` (or `encode`, for one k) and `decode_at`
signatures. An image keeps only as many codes as its quality target needs: the first
`num_codes` of its K, each log2(V) bits.

codes.npz: `ids` (each image's file name without extension), `codes` int32 [N, K] (0 beyond
each image's count), `num_codes` int32 [N].
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple

import numpy as np

from pipeline.run_config import UsageError

EXTENSIONS = (".png", ".jpg", ".jpeg")
BATCH = 256


def image_files(root: str) -> List[Tuple[str, str]]:
    """(id, path) of the images in `root` and its subfolders (class folders), sorted by
    path; ids are file names without extension and must be unique."""
    if not os.path.isdir(root):
        raise UsageError(f"--data_path={root} is not a directory of images")
    found, seen = [], {}
    for directory, subdirs, names in sorted(os.walk(root)):
        subdirs.sort()
        for name in sorted(names):
            if name.lower().endswith(EXTENSIONS):
                path = os.path.join(directory, name)
                image_id = os.path.splitext(name)[0]
                if image_id in seen:
                    raise UsageError(f"{seen[image_id]} and {path} both give id {image_id!r}; "
                                     "ids are file names without extension")
                seen[image_id] = path
                found.append((image_id, path))
    if not found:
        raise UsageError(f"--data_path={root} holds no {'/'.join(EXTENSIONS)} images")
    return found


def read_images(paths, shape) -> np.ndarray:
    """float32 [n, H, W, C] in [0, 1]; ValueError naming a file that is not an image of
    the model's size."""
    from PIL import Image

    height, width, channels = shape
    out = np.empty((len(paths), height, width, channels), np.float32)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"))
        except OSError as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
        if pixels.shape[:2] != (height, width):
            raise ValueError(f"image {path} is {pixels.shape[1]}x{pixels.shape[0]}, the model "
                             f"takes {width}x{height}")
        out[i] = pixels.reshape(height, width, channels) / 255.0
    return out


class _Model:
    def __init__(self, saved_model: str):
        import tensorflow as tf

        from ordered_vqvae.export import check_saved_model_dir

        try:
            check_saved_model_dir(saved_model)
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
        self.tf, self.module = tf, tf.saved_model.load(saved_model)
        self.signatures = self.module.signatures
        self.K, self.V = int(self.module.code_length), int(self.module.codebook_size)
        self.shape = tuple(int(d) for d in self.module.image_shape.numpy())
        if "encode_to_quality" not in self.signatures:
            raise UsageError(f"{saved_model} has no encode_to_quality signature; export it "
                             "again with this version (ovqvae export)")

    def call(self, name: str, **inputs) -> dict:
        return {k: v.numpy() for k, v in self.signatures[name](
            **{k: self.tf.constant(v) for k, v in inputs.items()}).items()}

    def bits_per_pixel(self, num_codes) -> float:
        return float(np.mean(num_codes)) * math.log2(self.V) / (self.shape[0] * self.shape[1])


def _psnr(mse) -> np.ndarray:
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))


def encode(saved_model: str, data_path: str, output: str, min_psnr: Optional[float] = None,
           max_mse: Optional[float] = None, num_codes: Optional[int] = None) -> dict:
    """Encodes every image under `data_path` to the target (exactly one of min_psnr,
    max_mse, num_codes) and writes codes.npz atomically; returns its arrays."""
    from ordered_vqvae.atomic import atomic_file

    given = [name for name, v in (("min_psnr", min_psnr), ("max_mse", max_mse),
                                  ("num_codes", num_codes)) if v is not None]
    if len(given) != 1:
        raise UsageError(f"encode takes one target of --min_psnr, --max_mse and --num_codes; "
                         f"got {given or 'none'}")
    if max_mse is not None and not 0 < max_mse < math.inf:
        raise UsageError(f"--max_mse={max_mse}, expected a number > 0")
    if min_psnr is not None and not 0 < min_psnr < 200:
        raise UsageError(f"--min_psnr={min_psnr}, expected a number in (0, 200) dB")
    files = image_files(data_path)
    model = _Model(saved_model)
    if num_codes is not None and not 1 <= num_codes <= model.K:
        raise UsageError(f"--num_codes={num_codes}, expected 1 <= num_codes <= {model.K}")
    target = max_mse if max_mse is not None else (
        10 ** (-min_psnr / 10) if min_psnr is not None else None)
    codes, counts, errors = [], [], []
    for start in range(0, len(files), BATCH):
        images = read_images([p for _, p in files[start:start + BATCH]], model.shape)
        if target is not None:
            out = model.call("encode_to_quality", images=images, max_mse=np.float32(target))
        else:
            full = model.call("encode", images=images)["codes"]
            k = np.full(len(images), num_codes, np.int32)
            decoded = model.call("decode_at", codes=full, num_codes=k)["images"]
            out = {"codes": np.where(np.arange(model.K) < num_codes, full, 0), "num_codes": k,
                   "mse": ((decoded - images) ** 2).mean(axis=(1, 2, 3))}
        codes.append(out["codes"].astype(np.int32))
        counts.append(out["num_codes"].astype(np.int32))
        errors.append(out["mse"])
    arrays = {"ids": np.array([i for i, _ in files]), "codes": np.concatenate(codes),
              "num_codes": np.concatenate(counts)}
    with atomic_file(output, "wb") as f:
        np.savez(f, **arrays)
    psnr = _psnr(np.concatenate(errors))
    print(f"[encode] {len(files)} images -> {output}: {arrays['num_codes'].mean():.2f} of "
          f"K={model.K} codes per image on average, {model.bits_per_pixel(arrays['num_codes']):.3f}"
          f" bits per pixel; PSNR {psnr.mean():.2f} dB mean, {np.percentile(psnr, 5):.2f} dB "
          f"5th percentile, {psnr.min():.2f} dB lowest", flush=True)
    return arrays


def load_codes(path: str, K: int, V: int) -> dict:
    """The arrays of a codes.npz, checked against the model (K codes of V codewords)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("ids", "codes", "num_codes") if k in npz.files}
    except (OSError, ValueError) as e:
        raise UsageError(f"--codes={path} is not a codes .npz ({e})") from None
    missing = sorted({"ids", "codes", "num_codes"} - set(arrays))
    if missing:
        raise UsageError(f"--codes={path} lacks {missing}; expected ids, codes, num_codes "
                         "(written by ovqvae encode)")
    ids, codes, counts = arrays["ids"], arrays["codes"], arrays["num_codes"]
    n = len(ids)
    if codes.shape != (n, K) or counts.shape != (n,):
        raise UsageError(f"--codes={path} has codes {list(codes.shape)} and num_codes "
                         f"{list(counts.shape)} for {n} ids; the model takes [N, {K}] and [N]")
    if n and (codes.min() < 0 or codes.max() >= V or counts.min() < 1 or counts.max() > K):
        raise UsageError(f"--codes={path} holds codes outside [0, {V}) or num_codes outside "
                         f"[1, {K}]")
    bad = [str(i) for i in ids if not str(i) or "/" in str(i) or str(i) in (".", "..")]
    if bad or len(set(ids.tolist())) != n:
        raise UsageError(f"--codes={path} has ids that are not distinct file names: "
                         f"{bad[:3] or 'duplicates'}")
    return {"ids": [str(i) for i in ids], "codes": codes.astype(np.int32),
            "num_codes": counts.astype(np.int32)}


def decode(saved_model: str, codes_path: str, output: str) -> None:
    """Writes output/<id>.png for every image of codes.npz, decoded from its first
    num_codes codes; the folder appears whole or not at all."""
    from PIL import Image

    from ordered_vqvae.atomic import atomic_directory

    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise UsageError(f"--output={output} exists and is not an empty directory; decode "
                         "writes a new folder")
    model = _Model(saved_model)
    arrays = load_codes(codes_path, model.K, model.V)
    with atomic_directory(output) as tmp:
        for start in range(0, len(arrays["ids"]), BATCH):
            part = slice(start, start + BATCH)
            images = model.call("decode_at", codes=arrays["codes"][part],
                                num_codes=arrays["num_codes"][part])["images"]
            for image_id, image in zip(arrays["ids"][part], images):
                pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
                Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(
                    os.path.join(tmp, f"{image_id}.png"))
    print(f"[decode] {len(arrays['ids'])} images -> {output}/: "
          f"{arrays['num_codes'].mean():.2f} codes per image on average, "
          f"{model.bits_per_pixel(arrays['num_codes']):.3f} bits per pixel", flush=True)


def command(name: str, flags) -> None:
    """`ovqvae encode` or `ovqvae decode` with the command line's flag values."""
    needed = (("saved_model", "data_path", "output") if name == "encode"
              else ("saved_model", "codes", "output"))
    for flag in needed:
        if not getattr(flags, flag):
            raise UsageError(f"{name} needs --{flag}")
    if name == "decode":
        return decode(flags.saved_model, flags.codes, flags.output)
    counts = flags.num_codes
    if counts is not None and (len(counts) != 1 or not counts[0].strip().isdigit()):
        raise UsageError(f"--num_codes={','.join(counts)}: encode takes one count")
    encode(flags.saved_model, flags.data_path, flags.output, flags.min_psnr, flags.max_mse,
           int(counts[0]) if counts else None)
