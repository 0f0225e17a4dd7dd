"""The readers on real public files from ../shared/data (skipped where that folder is absent)."""

from __future__ import annotations

import numpy as np
import openslide

from ingest import image, wsi
from ingest.config import IngestConfig
from ingest.schema import InputError

CFG = IngestConfig(wsi={"max_tiles_per_slide": 12, "min_tissue": 0.5})


def test_real_svs_slides_give_tissue_tiles(shared_data):
    for name in ("cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"):
        path = str(shared_data / "wsi" / name)
        assert wsi.is_slide(path)
        tiles = list(wsi.read_one(path, "PATH", CFG))
        assert 0 < len(tiles) <= 12, name
        with openslide.OpenSlide(path) as slide:
            width, height = slide.dimensions
            side = 224 * 0.5 / wsi.slide_mpp(slide, CFG.wsi)
        for tile in tiles:
            assert tile.pixels.shape == (224, 224, 3) and tile.pixels.dtype == np.uint8
            assert 0 <= tile.tile_x <= width - side + 1 and 0 <= tile.tile_y <= height - side + 1
            assert tile.pixels.std() > 5, "a tissue tile is not a flat colour"
        assert [(t.tile_x, t.tile_y) for t in wsi.read_one(path, "PATH", CFG)] == [(t.tile_x, t.tile_y) for t in tiles]


def test_real_plain_tiff_is_refused(shared_data):
    path = str(shared_data / "wsi" / "kidney-48-5.tif")
    assert not wsi.is_slide(path)
    ((index, err),) = list(wsi.read([path], "PATH", CFG))
    assert index == 0 and isinstance(err, InputError) and "not a whole-slide image" in str(err)
    assert "kidney" not in str(err)


def test_real_dermatoscopy_jpegs(shared_data):
    paths = sorted(str(p) for p in (shared_data / "derm_ham10000_sample70").glob("*/*.jpg"))
    assert len(paths) == 70
    results = list(image.read(paths, "DERM", IngestConfig()))
    assert [i for i, _ in results] == list(range(70))
    for _, img in results:
        assert not isinstance(img, Exception), img
        assert img.pixels.ndim == 3 and img.pixels.shape[2] == 3 and img.modality == "DERM"
