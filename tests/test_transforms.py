"""PIL/numpy image transforms: shapes, dtypes, determinism, crop bounds, normalisation."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from llm2clip.data.transforms import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, eval_transform, random_resized_crop_params,
                                      sample_rng, train_transform)


def _image(w=80, h=60, mode="RGB", seed=0):
    a = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(a, "RGB").convert(mode)


def test_constants():
    assert OPENAI_CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert OPENAI_CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "CMYK", "1", "I;16", "I", "F"])
def test_shapes_dtypes_any_mode(mode):
    img = _image(mode=mode) if mode not in ("I;16", "I", "F") else Image.fromarray(
        (np.arange(60 * 80).reshape(60, 80) % 4000).astype(np.uint16 if mode == "I;16" else np.int32 if mode == "I"
                                                             else np.float32))
    for tf in (train_transform(32, seed=0), eval_transform(32)):
        x = tf(img)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_rgba_transparent_is_white():
    img = Image.new("RGBA", (40, 40), (10, 200, 30, 0))  # fully transparent green
    x = eval_transform(16, mean=(0, 0, 0), std=(1, 1, 1))(img)
    torch.testing.assert_close(x, torch.ones(3, 16, 16))


def test_normalisation_values():
    img = Image.new("RGB", (50, 70), (255, 0, 128))
    mean, std = (0.5, 0.25, 0.1), (0.5, 0.5, 2.0)
    for x in (eval_transform(24, mean, std)(img), train_transform(24, mean, std, seed=1)(img)):
        expect = torch.tensor([(1.0 - 0.5) / 0.5, (0.0 - 0.25) / 0.5, (128 / 255 - 0.1) / 2.0])
        torch.testing.assert_close(x.mean(dim=(1, 2)), expect, atol=1e-5, rtol=0)
        torch.testing.assert_close(x.std(dim=(1, 2)), torch.zeros(3), atol=1e-5, rtol=0)


def test_eval_deterministic_and_centre_crop():
    img = _image(120, 60)
    tf = eval_transform(30, mean=(0, 0, 0), std=(1, 1, 1))
    torch.testing.assert_close(tf(img), tf(img), rtol=0, atol=0)
    # Resize 120x60 -> 60x30 then centre-crop 30x30 == the centre square of the resized image.
    ref = img.resize((60, 30), Image.Resampling.BICUBIC).crop((15, 0, 45, 30))
    np.testing.assert_allclose(tf(img).permute(1, 2, 0).numpy(), np.asarray(ref, np.float32) / 255, atol=1e-6)
    # Portrait and exact-size inputs.
    assert tf(_image(40, 90)).shape == (3, 30, 30) and tf(_image(30, 30)).shape == (3, 30, 30)


def test_train_crop_area_within_scale():
    w, h, scale, ratio = 200, 150, (0.9, 1.0), (3 / 4, 4 / 3)
    rng = random.Random(0)
    for _ in range(500):
        top, left, ch, cw = random_resized_crop_params(w, h, scale, ratio, rng)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
        frac = ch * cw / (w * h)
        # Rounding of w, h to integers moves the area by at most ~(w + h) pixels.
        assert scale[0] - (w + h) / (w * h) <= frac <= scale[1] + 1e-9
    # Fallback (impossible ratio for the image): centre crop clamped to the ratio range.
    top, left, ch, cw = random_resized_crop_params(1000, 10, (0.99, 1.0), (1.0, 1.0), random.Random(0))
    assert (ch, cw) == (10, 10) and top == 0 and left == 495


def test_train_reproducible_with_explicit_rng():
    img = _image()
    tf = train_transform(32, scale=(0.3, 1.0))
    a = tf(img, rng=sample_rng(0, 1, "key-000"))
    b = tf(img, rng=sample_rng(0, 1, "key-000"))
    c = tf(img, rng=sample_rng(0, 1, "key-001"))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    na = tf(img, rng=np.random.default_rng(5))
    torch.testing.assert_close(na, tf(img, rng=np.random.default_rng(5)), rtol=0, atol=0)
    # Seeded internal generator: same sequence for the same seed.
    t1, t2 = train_transform(32, scale=(0.3, 1.0), seed=7), train_transform(32, scale=(0.3, 1.0), seed=7)
    for _ in range(3):
        torch.testing.assert_close(t1(img), t2(img), rtol=0, atol=0)


def test_no_horizontal_flip():
    # Left half black, right half white: with full-image crops the left stays dark, the right bright.
    a = np.zeros((64, 64, 3), np.uint8)
    a[:, 32:] = 255
    img = Image.fromarray(a)
    tf = train_transform(32, mean=(0, 0, 0), std=(1, 1, 1), scale=(0.95, 1.0), ratio=(1.0, 1.0))
    for s in range(50):
        x = tf(img, rng=random.Random(s))
        assert x[:, :, :8].mean() < 0.1 and x[:, :, -8:].mean() > 0.9


def test_bad_arguments():
    with pytest.raises(ValueError):
        train_transform(32, scale=(0.0, 1.0))
    with pytest.raises(ValueError):
        train_transform(32, ratio=(2.0, 1.0))


def test_uint8_output_normalised_later_equals_the_float_output():
    """normalize=False ships uint8; `normalize` (the one implementation, also behind the float output)
    gives the float path's tensor bit for bit, in the model dtype on request; floats are refused."""
    import numpy as np
    import torch
    from PIL import Image
    from llm2clip.data.transforms import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, eval_transform, normalize, sample_rng,
                                          train_transform)

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    cases = [(lambda n: train_transform(32, normalize=n), lambda: {"rng": sample_rng(0, "k", 1)}),
             (lambda n: eval_transform(32, normalize=n), dict)]
    for make, kw in cases:
        f, u = make(True)(img, **kw()), make(False)(img, **kw())
        assert u.dtype == torch.uint8 and f.dtype == torch.float32 and u.shape == f.shape == (3, 32, 32)
        assert torch.equal(normalize(u, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), f)
        # the pre-uint8 reference: numpy float32 on the host
        a = (u.permute(1, 2, 0).numpy().astype(np.float32) / 255.0 - np.asarray(OPENAI_CLIP_MEAN, np.float32)) \
            / np.asarray(OPENAI_CLIP_STD, np.float32)
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))), f)
        assert torch.equal(normalize(u[None], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, torch.bfloat16)[0], f.bfloat16())
    with pytest.raises(TypeError, match="uint8"):
        normalize(f, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
