"""load_image and ImageList: every file kind is generated here, then opened through the library."""
import io
import pickle
import warnings

import numpy as np
import pytest
from PIL import Image

from retrieval_lib.data.images import MAX_ASPECT, MIN_SIZE, ImageError, ImageList, load_image


def _halves(w=64, h=40):
    """(h, w, 3) uint8: left half red, right half blue, one green pixel at the top-left."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2:] = (0, 0, 255)
    a[0, 0] = (0, 255, 0)
    return a


def _save(tmp_path, name, img, **kw):
    p = tmp_path / name
    img.save(p, **kw)
    return p


def test_plain_rgb_roundtrip(tmp_path):
    a = _halves()
    p = _save(tmp_path, "a.png", Image.fromarray(a))
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (64, 40)
    np.testing.assert_array_equal(np.asarray(im), a)


@pytest.mark.parametrize("orientation, turn", [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    a = _halves(48, 32)
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = _save(tmp_path, "rot.jpg", Image.fromarray(a), exif=exif.tobytes(), quality=95)
    im = np.asarray(load_image(p)).astype(int)
    expected = np.rot90(a, k=turn).astype(int)  # 6: 90° clockwise; 8: counter-clockwise; 3: 180°
    assert im.shape == expected.shape
    # JPEG is lossy: compare the big colour blocks (away from edges) only
    assert np.abs(im - expected).mean() < 12
    if orientation == 6:
        # stored left (red) half ends up on top, stored right (blue) at the bottom
        assert im[4, 8:-8, 0].mean() > 200 and im[-4, 8:-8, 2].mean() > 200


def test_box_is_in_upright_coordinates(tmp_path):
    a = _halves(48, 32)
    exif = Image.Exif()
    exif[0x0112] = 6
    p = _save(tmp_path, "rot.png", Image.fromarray(a), exif=exif.tobytes())
    upright = load_image(p, min_size=0)
    assert upright.size == (32, 48)
    box = (3, 5, 29, 40)
    np.testing.assert_array_equal(np.asarray(load_image(p, box=box, min_size=0)),
                                  np.asarray(upright.crop(box)))


def test_palette_greyscale_and_palette_transparency(tmp_path):
    pal = Image.new("P", (40, 34))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.paste(1, (0, 0, 20, 34))
    p = _save(tmp_path, "pal.png", pal)
    im = np.asarray(load_image(p))
    assert tuple(im[0, 0]) == (200, 100, 50) and tuple(im[0, 39]) == (10, 20, 30)

    p2 = _save(tmp_path, "pal_t.png", pal, transparency=1)  # index 1 transparent -> white
    im2 = np.asarray(load_image(p2))
    assert tuple(im2[0, 0]) == (255, 255, 255) and tuple(im2[0, 39]) == (10, 20, 30)

    g = np.arange(40 * 34, dtype=np.uint8).reshape(34, 40)
    p3 = _save(tmp_path, "grey.png", Image.fromarray(g, mode="L"))
    im3 = np.asarray(load_image(p3))
    assert im3.shape == (34, 40, 3)
    for c in range(3):
        np.testing.assert_array_equal(im3[..., c], g)


def test_rgba_is_composited_on_white(tmp_path):
    a = np.zeros((32, 40, 4), np.uint8)
    a[:, :10] = (255, 0, 0, 0)        # fully transparent red -> white
    a[:, 10:20] = (0, 0, 255, 255)    # opaque blue stays blue
    a[:, 20:] = (0, 0, 0, 128)        # half-transparent black -> grey
    p = _save(tmp_path, "rgba.png", Image.fromarray(a, mode="RGBA"))
    im = np.asarray(load_image(p)).astype(int)
    assert tuple(im[5, 5]) == (255, 255, 255)
    assert tuple(im[5, 15]) == (0, 0, 255)
    expected = round(255 * (1 - 128 / 255))  # alpha blend formula on white
    assert np.all(np.abs(im[5, 25] - expected) <= 1)


def test_cmyk_jpeg(tmp_path):
    rgb = Image.fromarray(_halves(48, 32))
    p = _save(tmp_path, "cmyk.jpg", rgb.convert("CMYK"), quality=95)
    with Image.open(p) as raw:
        assert raw.mode == "CMYK"
    im = np.asarray(load_image(p)).astype(int)
    ref = np.asarray(rgb).astype(int)
    assert np.abs(im[4:-4, 4:20] - ref[4:-4, 4:20]).max() < 16   # red block
    assert np.abs(im[4:-4, 28:-4] - ref[4:-4, 28:-4]).max() < 16  # blue block


def test_16bit_png_and_32bit_int(tmp_path):
    a = np.zeros((32, 40), np.uint16)
    a[:, :10] = 65535
    a[:, 10:20] = 257 * 100
    a[:, 20:30] = 0
    a[:, 30:] = 257 * 7 + 100  # 7.39 -> rounds to 7
    p = _save(tmp_path, "g16.png", Image.fromarray(a))
    with Image.open(p) as raw:
        assert raw.mode.startswith("I")
    im = np.asarray(load_image(p))
    assert im.dtype == np.uint8 and im.shape == (32, 40, 3)
    np.testing.assert_array_equal(im[0, [0, 15, 25, 35], 0], [255, 100, 0, 7])

    i32 = Image.fromarray(a.astype(np.int32), mode="I")
    assert i32.mode == "I"
    p2 = _save(tmp_path, "g32.tif", i32)
    np.testing.assert_array_equal(np.asarray(load_image(p2))[0, [0, 15, 25, 35], 1], [255, 100, 0, 7])


def _jpeg_bytes(w=64, h=48):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_truncated_random_and_missing_files_raise_naming_the_file(tmp_path):
    trunc = tmp_path / "truncated.jpg"
    data = _jpeg_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    noise = tmp_path / "noise.jpg"
    noise.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    for p in (trunc, noise, tmp_path / "missing.jpg"):
        with pytest.raises(ImageError, match=p.name):
            load_image(p)
    with pytest.raises(ImageError, match="corrupt, truncated"):
        load_image(trunc)
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "missing.jpg")


def test_on_error_skip_warns_and_returns_none(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="bad.jpg"):
        assert load_image(bad, on_error="skip") is None
    with pytest.raises(ValueError, match="on_error"):
        load_image(bad, on_error="ignore")


def test_small_image_is_enlarged_bicubic(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 255, (9, 12, 3), dtype=np.uint8)
    p = _save(tmp_path, "tiny.png", Image.fromarray(a))
    im = load_image(p)
    assert im.size == (43, 32)  # short side 9 -> 32, long 12 * 32 / 9 = 42.7 -> 43
    ref = Image.fromarray(a).resize((43, 32), Image.BICUBIC)
    np.testing.assert_array_equal(np.asarray(im), np.asarray(ref))
    assert load_image(p, min_size=0).size == (12, 9)
    assert load_image(p, min_size=8).size == (12, 9)


def test_extreme_aspect_is_refused_and_moderate_is_enlarged(tmp_path):
    p = _save(tmp_path, "line.png", Image.new("RGB", (1, 2000), (9, 9, 9)))
    with pytest.raises(ImageError, match=r"line\.png.*1×2000.*16:1"):
        load_image(p)
    assert load_image(p, max_aspect=float("inf"), min_size=0).size == (1, 2000)
    p2 = _save(tmp_path, "strip.png", Image.new("RGB", (10, 1), (9, 9, 9)))
    im = load_image(p2)
    assert im.size == (320, 32) and max(im.size) <= MAX_ASPECT * MIN_SIZE
    with pytest.raises(ValueError, match="max_aspect"):
        load_image(p2, max_aspect=0.5)


def test_box_is_rounded_clamped_and_empty_box_refused(tmp_path):
    a = np.arange(40 * 50 * 3, dtype=np.uint32).reshape(40, 50, 3).astype(np.uint8)
    p = _save(tmp_path, "a.png", Image.fromarray(a))
    im = np.asarray(load_image(p, box=(10.4, 5.6, 45.5, 39.2), min_size=0))
    np.testing.assert_array_equal(im, a[6:39, 10:46])  # round(45.5) = 46 (half to even), like PIL
    clamped = np.asarray(load_image(p, box=(-20, -3, 500, 30), min_size=0))
    np.testing.assert_array_equal(clamped, a[0:30, 0:50])
    with pytest.raises(ImageError, match="leaves nothing"):
        load_image(p, box=(60, 0, 80, 10))
    with pytest.raises(ImageError, match="leaves nothing"):
        load_image(p, box=(20, 10, 5, 30))
    with pytest.raises(ImageError, match=r"\(x0, y0, x1, y1\)"):
        load_image(p, box=(1, 2, 3))
    # a small crop goes through the size rule like any small image
    assert min(load_image(p, box=(0, 0, 16, 10)).size) == MIN_SIZE


def test_image_list_skip_records_indices_and_validate(tmp_path):
    good = _save(tmp_path, "good.png", Image.fromarray(_halves()))
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    _save(tmp_path, "line.png", Image.new("RGB", (1, 2000)))
    names = ["good.png", "bad.jpg", "good.png", "line.png", "gone.jpg"]

    strict = ImageList(names, root=tmp_path)
    assert strict.paths[0] == str(good) and len(strict) == 5
    assert strict[0].size == (64, 40)
    with pytest.raises(ImageError, match="bad.jpg"):
        strict[1]
    assert strict.validate(progress=False) == [1, 3, 4]
    assert strict.skipped == [1, 3, 4]

    lenient = ImageList(names, root=tmp_path, on_error="skip", name="mixed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [lenient[i] for i in range(len(lenient))]
    assert [i for i, x in enumerate(items) if x is None] == [1, 3, 4]
    assert lenient.skipped == [1, 3, 4] and len(caught) == 3
    assert lenient[-5].size == (64, 40)
    with pytest.raises(IndexError):
        lenient[5]
    assert "mixed" in repr(lenient) and "5 images" in repr(lenient)
    # picklable (DataLoader workers get a copy)
    assert pickle.loads(pickle.dumps(lenient)).paths == lenient.paths


def test_image_list_boxes(tmp_path):
    a = np.arange(40 * 50 * 3, dtype=np.uint32).reshape(40, 50, 3).astype(np.uint8)
    _save(tmp_path, "a.png", Image.fromarray(a))
    imgs = ImageList(["a.png", "a.png"], boxes=[(0, 0, 40, 35), None], root=tmp_path, min_size=0)
    assert imgs.boxes == [(0.0, 0.0, 40.0, 35.0), None]
    np.testing.assert_array_equal(np.asarray(imgs[0]), a[:35, :40])
    np.testing.assert_array_equal(np.asarray(imgs[1]), a)
    with pytest.raises(ValueError, match="2 boxes for 1 images"):
        ImageList(["a.png"], boxes=[None, None])
    with pytest.raises(ValueError, match=r"\(x0, y0, x1, y1\)"):
        ImageList(["a.png"], boxes=[(1, 2)])
    with pytest.raises(ValueError, match="on_error"):
        ImageList(["a.png"], on_error="warn")
