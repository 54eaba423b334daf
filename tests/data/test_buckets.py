"""Aspect-ratio buckets: the sizes kohya-style training uses, and which one each image lands in."""

import math

import pytest

from sdtune.data.buckets import assign_bucket, format_bucket, make_buckets, parse_bucket
from sdtune.errors import SdtuneError


def test_sd15_buckets_keep_the_area_and_step():
    buckets = make_buckets(512 * 512, step=64)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(w * h <= 512 * 512 for w, h in buckets)
    assert all(256 <= side <= 1024 for bucket in buckets for side in bucket)
    assert buckets == sorted(buckets, key=lambda b: b[0] / b[1])
    assert {(h, w) for w, h in buckets} == set(buckets)  # portrait and landscape alike


def test_images_go_to_the_nearest_aspect_ratio():
    buckets = make_buckets(512 * 512)
    assert assign_bucket(1000, 1000, buckets) == (512, 512)
    wide = assign_bucket(1920, 1080, buckets)
    assert wide[0] > wide[1]
    best = min(abs(math.log(b[0] / b[1]) - math.log(1920 / 1080)) for b in buckets)
    assert abs(math.log(wide[0] / wide[1]) - math.log(1920 / 1080)) == best
    tall = assign_bucket(1080, 1920, buckets)
    assert tall == (wide[1], wide[0])
    assert assign_bucket(10_000, 10, buckets) == (1024, 256)  # beyond the widest: the widest


def test_sdxl_area_and_text_round_trip():
    assert (1024, 1024) in make_buckets(1024 * 1024)
    assert parse_bucket(format_bucket((448, 576))) == (448, 576)
    with pytest.raises(SdtuneError, match="WIDTHxHEIGHT"):
        parse_bucket("448 by 576")
    with pytest.raises(SdtuneError, match="smaller than one"):
        make_buckets(32 * 32, step=64)
