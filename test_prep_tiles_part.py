"""Tests for prep_tiles.py (CPU, real slides from ../shared/datasets; outputs only under tmp_path).
Expected counts and corners are worked out by hand from the slide sizes in each test's comment."""
import csv
import os
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

import prep_tiles

DATA = Path(__file__).resolve().parent.parent / "shared" / "datasets"
CMU = DATA / "wsi-real" / "CMU-1-Small-Region.svs"            # 1 level, 2220 x 2967, 0.499 µm/px
TCGA = DATA / "wsi-real" / "tcga-cr-7395-01a-01-ts1.svs"      # 4443 x 3567 / 2221 x 1783, no mpp in the header
SYN = DATA / "wsi-synthetic-openslide-python"                   # boxes.tiff: 300x250 / 150x125 / 75x62 / 37x31
COLUMNS = "slide_id,path,status,error,n_tiles,mpp_level0,mpp_source,read_level,read_mpp,seconds"


def rows(out):
    with open(out / "slides.csv", newline="") as f:
        assert f.readline().strip() == COLUMNS  # the exact header g2l.py relies on
        f.seek(0)
        return {r["slide_id"]: r for r in csv.DictReader(f)}


def corners(folder):
    """{(x, y)} parsed from <slide_id>_x<X>_y<Y>.<ext> names."""
    out = set()
    for p in folder.iterdir():
        x, y = p.stem.rsplit("_x", 1)[1].split("_y")
        out.add((int(x), int(y)))
    return out


def test_cmu_at_05_reads_level0_without_resize(tmp_path):
    # 0.499 is within 5% of 0.5: tiles are raw 224-px level-0 crops on a 224-px stride.
    # 2220 px wide -> floor((2220-224)/224)+1 = 9 columns; 2967 tall -> floor((2967-224)/224)+1 = 13 rows.
    assert prep_tiles.main([str(CMU), "--out", str(tmp_path), "--min-tissue", "0", "--format", "png"]) == 0
    r = rows(tmp_path)["CMU-1-Small-Region"]
    assert (r["status"], r["n_tiles"], r["read_level"], r["read_mpp"]) == ("ok", "117", "0", "0.4990")
    assert (r["mpp_level0"], r["mpp_source"]) == ("0.4990", "openslide.mpp-x")
    folder = tmp_path / "CMU-1-Small-Region"
    assert corners(folder) == {(224 * i, 224 * j) for i in range(9) for j in range(13)}
    # a tile is exactly the slide's level-0 pixels there (no resize), composited to RGB
    tile = np.asarray(Image.open(folder / "CMU-1-Small-Region_x448_y672.png"))
    with openslide.OpenSlide(str(CMU)) as s:
        ref = np.asarray(s.read_region((448, 672), 0, (224, 224)).convert("RGB"))
    assert tile.shape == (224, 224, 3) and np.array_equal(tile, ref)
    assert Image.open(tmp_path / "masks" / "CMU-1-Small-Region.png").size == (277, 370)  # 2220*0.499/4, 2967*0.499/4


def test_cmu_at_1_downsamples_level0(tmp_path):
    # 1.0 µm/px: level 0 is 2x too fine -> read round(224/0.499) = 449 px and resize to 224.
    # footprint = stride = 448.898 level-0 px -> 4 columns (1771.1/448.9 = 3.9), 6 rows (2518.1/448.9 = 5.6).
    assert prep_tiles.main([str(CMU), "--out", str(tmp_path), "--mpp", "1.0", "--min-tissue", "0"]) == 0
    r = rows(tmp_path)["CMU-1-Small-Region"]
    assert (r["status"], r["n_tiles"], r["read_level"], r["read_mpp"]) == ("ok", "24", "0", "1.0000")
    xs, ys = [0, 449, 898, 1347], [0, 449, 898, 1347, 1796, 2244]  # round(i * 448.898)
    assert corners(tmp_path / "CMU-1-Small-Region") == {(x, y) for x in xs for y in ys}
    for p in (tmp_path / "CMU-1-Small-Region").iterdir():
        im = Image.open(p)
        assert (im.mode, im.size) == ("RGB", (224, 224))


def test_tissue_filter_tiles_decode_and_have_no_black(tmp_path):
    assert prep_tiles.main([str(CMU), "--out", str(tmp_path)]) == 0
    folder = tmp_path / "CMU-1-Small-Region"
    kept = corners(folder)
    assert 10 < len(kept) < 117 and kept <= {(224 * i, 224 * j) for i in range(9) for j in range(13)}
    blank = []
    for p in folder.iterdir():
        a = np.asarray(Image.open(p).convert("RGB"))
        assert Image.open(p).mode == "RGB" and a.shape == (224, 224, 3)
        assert (a.max(2) < 10).mean() < 0.01, p.name          # no black background
        blank.append((a.min(2) > 235).mean())                  # bright glass
    # --min-tissue 0.5 on a 4 µm/px mask: each tile is mostly tissue (the mask's edges are a few µm generous)
    assert max(blank) < 0.6 and np.mean(blank) < 0.25


def test_read_rgb_composites_outside_the_scan_onto_white():
    with openslide.OpenSlide(str(CMU)) as s:  # a region hanging 228 px off the right edge, 167 px off the bottom
        a = np.asarray(prep_tiles.read_rgb(s, (2000, 2800), 0, (448, 334)))
        raw = np.asarray(s.read_region((2000, 2800), 0, (448, 334)))
    assert raw[:, 300:, :3].max() == 0                      # what OpenSlide returns there: transparent black
    assert a.shape == (334, 448, 3) and (a[:, 300:] == 255).all() and (a[200:] == 255).all()


def test_tcga_without_mpp_fails_clearly_with_override_reads_level1(tmp_path, capsys):
    assert prep_tiles.main([str(TCGA), "--out", str(tmp_path / "a")]) == 1
    r = rows(tmp_path / "a")["tcga-cr-7395-01a-01-ts1"]
    assert r["status"] == "failed" and "--mpp-override" in r["error"] and "aperio.MPP" in r["error"]
    assert str(TCGA) in capsys.readouterr().err and not (tmp_path / "a" / "tcga-cr-7395-01a-01-ts1").exists()
    # override 0.25: level 1 is 0.25 * 2.0005 = 0.5001 µm/px, within tolerance of 0.5 -> read as is.
    # footprint = 224 * 2.0005 = 448.11 level-0 px -> floor((4443-448.1)/448.1)+1 = 9 cols, (3567-448.1)/448.1 -> 7 rows
    out = tmp_path / "b"
    assert prep_tiles.main([str(TCGA), "--out", str(out), "--mpp-override", "0.25", "--min-tissue", "0"]) == 0
    r = rows(out)["tcga-cr-7395-01a-01-ts1"]
    assert (r["status"], r["n_tiles"], r["read_level"], r["read_mpp"], r["mpp_source"]) == \
        ("ok", "63", "1", "0.5001", "override")
    with openslide.OpenSlide(str(TCGA)) as s:
        ds = s.level_downsamples[1]
    assert corners(out / "tcga-cr-7395-01a-01-ts1") == {
        (round(i * 224 * ds), round(j * 224 * ds)) for i in range(9) for j in range(7)}
    assert corners(out / "tcga-cr-7395-01a-01-ts1") >= {(0, 0), (448, 448), (3585, 2689)}


def test_choose_level_on_the_boxes_pyramid():
    with openslide.OpenSlide(str(SYN / "boxes.tiff")) as s:
        ds = s.level_downsamples                             # (1, 2, 4.016, 8.086)
        with pytest.raises(ValueError, match="352.7"):       # 72-dpi placeholder: implausible, named
            prep_tiles.slide_mpp(s)
        assert prep_tiles.slide_mpp(s, 0.25) == (0.25, "override")
    pick = lambda target: prep_tiles.choose_level(0.25, ds, target, 0.05)
    assert pick(0.25) == (0, 0.25, False)
    assert pick(0.5) == (1, 0.5, False)
    assert pick(0.7)[::2] == (1, True)                       # between levels: finer level, then downsample
    assert pick(1.0)[::2] == (2, False)                      # 1.004 is within 5%
    assert pick(2.0)[::2] == (3, False)                      # 2.0216 <= 2.0 * 1.05: coarsest that is fine enough
    assert pick(1.9)[::2] == (2, True)                       # 2.0216 > 1.995: level 3 is too coarse
    with pytest.raises(ValueError, match="never upsamples"):
        pick(0.2)
    # the case get_best_level_for_downsample gets wrong: a level at 0.9975 µm/px for a 1.0 target is usable as is
    assert prep_tiles.choose_level(0.25, (1, 3.99, 16), 1.0, 0.05) == (1, 0.25 * 3.99, False)


def test_boxes_tiff_tiles_from_level2_with_override(tmp_path):
    # override 0.25, target 1.0 -> level 2 (1.004 µm/px) as is; 16-px tiles = 64.26 level-0 px:
    # 300 wide -> floor(235.7/64.26)+1 = 4 cols, 250 tall -> floor(185.7/64.26)+1 = 3 rows
    args = [str(SYN / "boxes.tiff"), "--out", str(tmp_path), "--mpp-override", "0.25", "--mpp", "1.0",
            "--tile-size", "16", "--min-tissue", "0", "--format", "png"]
    assert prep_tiles.main(args) == 0
    r = rows(tmp_path)["boxes"]
    assert (r["status"], r["n_tiles"], r["read_level"], r["read_mpp"]) == ("ok", "12", "2", "1.0040")
    assert corners(tmp_path / "boxes") == {(x, y) for x in (0, 64, 129, 193) for y in (0, 64, 129)}


def test_broken_slides_fail_alone_and_exit_nonzero(tmp_path, capsys):
    bad = [SYN / "unopenable.tiff", SYN / "unreadable.svs"]
    assert prep_tiles.main([*map(str, bad), str(CMU), "--out", str(tmp_path), "--mpp", "1.0"]) == 1
    r = rows(tmp_path)
    assert r["unopenable"]["status"] == "failed" and "cannot open" in r["unopenable"]["error"]
    assert r["unreadable"]["status"] == "failed" and "corrupt" in r["unreadable"]["error"]
    assert r["CMU-1-Small-Region"]["status"] == "ok" and int(r["CMU-1-Small-Region"]["n_tiles"]) > 0
    err = capsys.readouterr().err
    assert all(str(p) in err for p in bad)
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())  # nothing half-written left behind
    assert not (tmp_path / "unreadable").exists()


def test_resume_skips_finished_slides_and_overwrite_redoes_them(tmp_path):
    args = [str(CMU), "--out", str(tmp_path), "--mpp", "1.0"]
    (tmp_path / ".tmp_CMU-1-Small-Region").mkdir()       # what a killed run leaves behind: cleaned, never used
    (tmp_path / ".tmp_CMU-1-Small-Region" / "junk.jpg").write_bytes(b"x")
    assert prep_tiles.main(args) == 0
    folder = tmp_path / "CMU-1-Small-Region"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert "junk.jpg" not in before and not (tmp_path / ".tmp_CMU-1-Small-Region").exists()
    assert prep_tiles.main(args) == 0
    r = rows(tmp_path)["CMU-1-Small-Region"]
    assert (r["status"], int(r["n_tiles"]), r["read_mpp"]) == ("skipped", len(before), "1.0000")
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # untouched
    assert prep_tiles.main(args + ["--overwrite"]) == 0
    assert rows(tmp_path)["CMU-1-Small-Region"]["status"] == "ok"


def test_block_reads_match_naive_reads(tmp_path):
    # the fast path (one read_region per 8x8 block) must give the same pixels as one read_region per tile
    for block in ("1", "8"):
        prep_tiles.main([str(CMU), "--out", str(tmp_path / block), "--block", block, "--mpp", "1.0",
                         "--min-tissue", "0", "--format", "png"])
    names = sorted(p.name for p in (tmp_path / "1" / "CMU-1-Small-Region").iterdir())
    assert len(names) == 24 and names == sorted(p.name for p in (tmp_path / "8" / "CMU-1-Small-Region").iterdir())
    for n in names:
        a, b = [np.asarray(Image.open(tmp_path / k / "CMU-1-Small-Region" / n)) for k in ("1", "8")]
        assert np.array_equal(a, b), n


def test_max_tiles_is_a_seeded_sample(tmp_path):
    run = lambda name, seed: prep_tiles.main([str(CMU), "--out", str(tmp_path / name), "--mpp", "1.0",
                                              "--min-tissue", "0", "--max-tiles", "5", "--seed", seed]) or \
        corners(tmp_path / name / "CMU-1-Small-Region")
    a, b, c = run("a", "0"), run("b", "0"), run("c", "1")
    assert len(a) == 5 and a == b and a != c


def test_argument_errors_stop_before_any_work(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        os.symlink(CMU, tmp_path / d / "same.svs")
    out = tmp_path / "out"
    cases = [([str(CMU), "--overlap", "224"], "--overlap"),
             ([str(tmp_path / "empty")], "no slides found"),
             ([str(tmp_path / "x"), str(tmp_path / "y")], "duplicate"),
             ([str(CMU), "--mpp-override", "352.8"], "implausible")]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            prep_tiles.main(argv + ["--out", str(out)])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not out.exists()


def test_mpp_header_wins_over_override_and_upsampling_is_refused(tmp_path):
    assert prep_tiles.main([str(CMU), "--out", str(tmp_path), "--mpp-override", "0.25", "--mpp", "1.0"]) == 0
    assert rows(tmp_path)["CMU-1-Small-Region"]["mpp_source"] == "openslide.mpp-x"
    assert prep_tiles.main([str(CMU), "--out", str(tmp_path / "b"), "--mpp", "0.25"]) == 1
    assert "never upsamples" in rows(tmp_path / "b")["CMU-1-Small-Region"]["error"]


def test_find_slides_and_dicom(tmp_path):
    ids = [sid for sid, _ in prep_tiles.find_slides([str(SYN)])]
    # boxes_0.dcm + boxes_1.dcm are one DICOM slide, named after their folder; boxes.png is not a slide
    assert sorted(ids) == ["boxes", "small", "unopenable", "unreadable", "wsi-synthetic-openslide-python"]
    # 16x16 at 0.499 µm/px with 8-px tiles -> 2 x 2 tiles
    args = [str(SYN / "boxes_0.dcm"), "--out", str(tmp_path), "--tile-size", "8", "--min-tissue", "0"]
    assert prep_tiles.main(args) == 0 and rows(tmp_path)["boxes_0"]["n_tiles"] == "4"
    assert corners(tmp_path / "boxes_0") == {(0, 0), (8, 0), (0, 8), (8, 8)}
    assert prep_tiles.main([str(SYN / "small.svs"), "--out", str(tmp_path)]) == 0  # no_tissue is not a failure
    assert "smaller than one 224-px tile" in rows(tmp_path)["small"]["error"]


def test_tissue_mask_on_a_drawn_slide():
    # white background, a pink 60x60 "tissue" square, a 10x10 pink speck (100 px < 625 px = 0.01 mm² at
    # 4 µm/px) and a black (outside-the-scan) band: only the square is tissue
    a = np.full((200, 200, 3), 255, np.uint8)
    a[20:80, 20:80] = (200, 100, 160)
    a[150:160, 150:160] = (200, 100, 160)
    a[120:, :60] = 0
    m = prep_tiles.tissue_mask(Image.fromarray(a), 4.0)
    assert m[24:76, 24:76].all() and m.sum() < 60 * 60 * 1.05
    assert not m[140:170, 140:170].any() and not m[120:, :60].any()
    frac = prep_tiles.tissue_fraction(m, [(20, 20), (50, 20), (120, 120)], 60, (200, 200))
    assert frac[0] > 0.95 and 0.45 < frac[1] < 0.55 and frac[2] == 0


def test_drop_small_counts_8_connected_components():
    m = np.zeros((6, 8), bool)
    m[0:5, 1] = m[0:5, 4] = m[4, 1:5] = True   # a U: two runs per row that only join at the bottom (12 px)
    m[0, 6] = m[1, 7] = True                    # two pixels touching diagonally: one 2-px component
    assert np.array_equal(prep_tiles.drop_small(m, 12), m & (np.arange(8) < 6))
    assert not prep_tiles.drop_small(m, 13).any()
    assert np.array_equal(prep_tiles.drop_small(m, 2), m)
    assert prep_tiles.tile_grid(2220, 2967, 224, 112)[:3] == [(0, 0), (112, 0), (224, 0)]
    assert len(prep_tiles.tile_grid(2220, 2967, 224, 112)) == 18 * 25  # overlap 112: floor(1996/112)+1, floor(2743/112)+1


def test_worker_pool_and_fail_fast(tmp_path):
    slides = [str(SYN / "unreadable.svs"), str(SYN / "small.svs"), str(CMU)]
    assert prep_tiles.main(slides + ["--out", str(tmp_path / "pool"), "--workers", "2", "--mpp", "1.0"]) == 1
    r = rows(tmp_path / "pool")  # every slide recorded, in input order, whatever order the workers finished in
    assert list(r) == ["unreadable", "small", "CMU-1-Small-Region"]
    assert [v["status"] for v in r.values()] == ["failed", "no_tissue", "ok"]
    assert prep_tiles.main(slides + ["--out", str(tmp_path / "ff"), "--fail-fast"]) == 1
    assert list(rows(tmp_path / "ff")) == ["unreadable"] and not (tmp_path / "ff" / "CMU-1-Small-Region").exists()
