"""Visual sentences (LVM): the layout BOS / codes / EOS, the successor and flip rules, and
determinism by (seed, index)."""

import numpy as np
import pytest

from mmjax.data import visual_sentences as vs
from mmjax.errors import ConfigError, InputError

LABELS = np.repeat(np.arange(10), 5)  # 50 images, 5 of each digit


def test_successor_sentences_count_up_mod_10_and_are_deterministic():
    starts = set()
    for i in range(40):
        picks, mirrored = vs.sentence_images("successor", LABELS, 4, seed=3, index=i)
        digits = LABELS[picks]
        assert list(digits) == [(digits[0] + j) % 10 for j in range(4)]
        assert not mirrored.any()
        starts.add(int(digits[0]))
        again = vs.sentence_images("successor", LABELS, 4, seed=3, index=i)
        np.testing.assert_array_equal(picks, again[0])
    assert len(starts) >= 8  # every start digit is drawn
    assert any(not np.array_equal(vs.sentence_images("successor", LABELS, 4, 3, i)[0],
                                  vs.sentence_images("successor", LABELS, 4, 4, i)[0]) for i in range(5))


def test_flip_sentences_are_image_mirror_pairs():
    picks, mirrored = vs.sentence_images("flip", LABELS, 6, seed=0, index=7)
    assert list(mirrored) == [False, True] * 3
    assert all(picks[2 * j] == picks[2 * j + 1] for j in range(3))


def test_tokens_layout():
    codes = np.arange(50 * 4).reshape(50, 4) % 16
    mirror = (codes + 1) % 16
    picks, mirrored = np.array([3, 3, 9, 9]), np.array([False, True, False, True])
    row = vs.sentence_tokens(codes, mirror, picks, mirrored, codebook_size=16)
    bos, eos = vs.special_ids(16)
    assert (bos, eos) == (16, 17)
    np.testing.assert_array_equal(row, [bos, *codes[3], *mirror[3], *codes[9], *mirror[9], eos])
    assert row.dtype == np.int32
    with pytest.raises(InputError, match="mirrored images' tokens"):
        vs.sentence_tokens(codes, None, picks, mirrored, 16)


def test_bad_settings_and_codes():
    with pytest.raises(ConfigError, match="one of successor, flip"):
        vs.check_kind("rotate", 3)
    with pytest.raises(ConfigError, match="must be even"):
        vs.check_kind("flip", 3)
    with pytest.raises(ConfigError, match=">= 2"):
        vs.check_kind("successor", 1)
    with pytest.raises(InputError, match=r"code 16 is outside the codebook \[0, 16\)"):
        vs.check_tokens(np.array([[0, 16]]), 16)
    with pytest.raises(InputError, match="integer codes"):
        vs.check_tokens(np.array([0.5]), 16)
    with pytest.raises(InputError, match="no image of digit 9"):
        vs.sentence_images("successor", np.arange(9), 10, 0, 0)
