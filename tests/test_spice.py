"""SPICE: computed when Stanford CoreNLP's jars are installed, and `eval.require_spice` fails without them.

pycocoevalcap ships SPICE's own jar but downloads Stanford CoreNLP 3.6.0 on first use;
evaluation never downloads it (docs/launching.md, "SPICE", says where the two jars go).
Debian has no CoreNLP package (``apt-cache search corenlp`` finds none), so CI runs the
scoring test only where someone installed the jars, and skips it with the reason otherwise.
"""

from __future__ import annotations

import pytest
from journeys import launch

from blip2_megatron.config import load_job_config
from blip2_megatron.eval import caption as caption_module
from blip2_megatron.eval.caption import (
    SpiceUnavailableError,
    check_spice_available,
    score_captions,
    spice_unavailable_reason,
)

REFERENCES = {
    1: "a red circle on the left",
    2: "a small blue square at the top",
    3: "a large green triangle in the center",
}


def _ground_truth() -> dict:
    return {
        "images": [{"id": image_id} for image_id in REFERENCES],
        "annotations": [
            {"image_id": image_id, "caption": caption, "id": image_id}
            for image_id, caption in REFERENCES.items()
        ],
    }


@pytest.fixture
def spice_without_corenlp(tmp_path, monkeypatch):
    """pycocoevalcap's SPICE folder as pip installs it: SPICE's jar, no CoreNLP jars in lib/."""
    (tmp_path / "spice-1.0.jar").write_bytes(b"")
    (tmp_path / "lib").mkdir()
    monkeypatch.setattr(caption_module, "_spice_dir", lambda: tmp_path)
    return tmp_path


def test_require_spice_is_a_config_field():
    assert load_job_config(None, []).eval.require_spice is False
    assert load_job_config(None, ["eval.require_spice=true"]).eval.require_spice is True


def test_required_spice_without_corenlp_fails_naming_the_jars_and_where_they_go(spice_without_corenlp):
    lib = spice_without_corenlp / "lib"
    with pytest.raises(SpiceUnavailableError) as raised:
        check_spice_available()
    message = str(raised.value)
    assert "eval.require_spice=true" in message
    assert "stanford-corenlp-3.6.0.jar" in message and "stanford-corenlp-3.6.0-models.jar" in message
    assert f"into {lib}" in message
    with pytest.raises(SpiceUnavailableError, match="Stanford CoreNLP is missing"):
        score_captions(
            [{"image_id": i, "caption": c} for i, c in REFERENCES.items()], _ground_truth(), with_spice=True
        )


@pytest.mark.slow
@pytest.mark.journey
def test_evaluate_with_require_spice_fails_before_generating_when_corenlp_is_missing(tmp_path, sample):
    reason = spice_unavailable_reason()
    if reason is None:
        pytest.skip("Stanford CoreNLP is installed here: the failure path is tested in-process above")
    proc = launch(
        "evaluate.py",
        "--output",
        str(tmp_path),
        f"data.sample_root={sample.root}",
        "eval.require_spice=true",
        "eval.max_samples=4",
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "evaluation failed: SPICE is required (eval.require_spice=true" in proc.stderr
    assert "stanford-corenlp-3.6.0-models.jar" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "eval" / "captions_val.json").exists()  # stopped before generating


def test_spice_is_computed_when_corenlp_is_installed():
    reason = spice_unavailable_reason()
    if reason is not None:
        pytest.skip(f"SPICE cannot run here: {reason}")
    perfect = [{"image_id": i, "caption": c} for i, c in REFERENCES.items()]
    wrong = [{"image_id": i, "caption": "two dogs play with a ball on the grass"} for i in REFERENCES]
    exact = score_captions(perfect, _ground_truth(), with_spice=True)
    off = score_captions(wrong, _ground_truth(), with_spice=True)
    assert exact["SPICE"] == pytest.approx(1.0, abs=1e-6)
    assert off["SPICE"] < 0.2
