"""Reader study: blinded, seeded per-reader order, ratings stored per reader, export with a per-method
summary; the page driven through AppTest as a clinician (the method is never named)."""

from __future__ import annotations

import pandas as pd
import pytest

from softcam_core.cli import main
from softcam_core.reader_study import rating_summary, study_order
from tests.plugins.app import make_tiny_checkpoint
from tests.test_app_pages import open_app, texts


def test_study_order_is_seeded_per_reader_and_complete():
    first = study_order([1, 2, 3], ["softcam", "gradcam"], seed=7, reader_id=1)
    assert sorted(first) == sorted((i, m) for i in (1, 2, 3) for m in ("softcam", "gradcam"))
    assert first == study_order([1, 2, 3], ["softcam", "gradcam"], seed=7, reader_id=1)  # the same on every visit
    assert first != study_order([1, 2, 3], ["softcam", "gradcam"], seed=7, reader_id=2)  # each reader their own
    assert first != study_order([1, 2, 3], ["softcam", "gradcam"], seed=8, reader_id=1)


def test_rating_summary_pins():
    answers = pd.DataFrame({"reader": ["a", "a", "b", "b", "a"], "image": [1, 2, 1, 2, 1],
                            "method": ["softcam", "softcam", "softcam", "softcam", "sanity:centre"],
                            "rating": [5, 4, 3, 4, 2]})
    summary = rating_summary(answers, resamples=500).set_index("method")
    assert summary.loc["softcam", "mean"] == 4.0 and summary.loc["softcam", "median"] == 4.0
    assert summary.loc["softcam", "share_4_or_5"] == 0.75 and summary.loc["softcam", "readers"] == 2
    assert 3.0 <= summary.loc["softcam", "ci_low"] <= 4.0 <= summary.loc["softcam", "ci_high"] <= 5.0
    # one rating: a zero-width interval, not a made-up one
    assert summary.loc["sanity:centre", ["mean", "ci_low", "ci_high"]].tolist() == [2.0, 2.0, 2.0]
    assert list(summary.index) == ["softcam", "sanity:centre"]  # best first


def test_study_cli_and_answers(real_data, db_env, session, tmp_path, capsys):
    from db import repository

    repository.import_images(session, [real_data / "fundus_kaggle_dr" / "images"], "eyepacs")
    for name in ("reader_a", "reader_b"):
        repository.get_or_create_user(session, name, role="clinician")
    session.commit()
    model = make_tiny_checkpoint(tmp_path / "m.pt")
    assert main(["study", "create", "--name", "pilot", "--cohort", "eyepacs", "--model", str(model), "--methods",
                 "softcam,gradcam,sanity:centre", "--images", "4", "--seed", "3"]) == 0
    assert "4 image(s) x 3 method(s) = 12 maps per reader" in capsys.readouterr().out
    assert main(["study", "create", "--name", "bad", "--cohort", "eyepacs", "--model", str(model),
                 "--methods", "softcam,nope"]) != 0
    assert "unknown method 'nope'" in capsys.readouterr().err

    study = repository.get_study(session, "pilot")
    a_items, answered = repository.reader_items(session, study, "reader_a")
    b_items, _ = repository.reader_items(session, study, "reader_b")
    assert len(a_items) == 12 and not answered and sorted(a_items) == sorted(b_items) and a_items != b_items
    for (image_id, method), rating in zip(a_items, [5, 4, 3, 2, 1, 5, 4, 3, 2, 1, 5, 4]):
        repository.record_answer(session, study, "reader_a", image_id, method, rating)
    image_id, method = b_items[0]
    repository.record_answer(session, study, "reader_b", image_id, method, 2, point=(100.5, 200.0))
    repository.record_answer(session, study, "reader_b", image_id, method, 3)  # rating again replaces it
    with pytest.raises(ValueError, match="rating must be one of 1, 2, 3, 4, 5"):
        repository.record_answer(session, study, "reader_b", image_id, method, 6)
    with pytest.raises(ValueError, match="not an item of study 'pilot'"):
        repository.record_answer(session, study, "reader_b", image_id, "layercam", 3)
    with pytest.raises(ValueError, match="outside the 512x512 image"):
        repository.record_answer(session, study, "reader_b", image_id, method, 3, point=(600, 10))
    assert len(repository.reader_items(session, study, "reader_a")[1]) == 12
    session.commit()  # the CLI below is another connection

    out = tmp_path / "answers.csv"
    assert main(["study", "export", "--name", "pilot", "--out", str(out), "--bootstrap", "200"]) == 0
    assert "13 answer(s) by 2 reader(s)" in capsys.readouterr().out
    answers = pd.read_csv(out)
    assert len(answers) == 13 and set(answers.reader) == {"reader_a", "reader_b"}
    assert answers.image.str.startswith("img-").all()  # pseudonyms only
    summary = pd.read_csv(tmp_path / "answers.summary.csv").set_index("method")
    expected = answers.groupby("method").rating.mean()
    assert summary["mean"].to_dict() == pytest.approx(expected.to_dict())
    assert summary.ratings.sum() == 13


def test_reader_study_page_is_blinded_and_stores_the_rating(app_home):
    from db import repository
    from db.session import session_scope

    with session_scope() as s:
        reader = repository.get_or_create_user(s, "dr_reader", role="clinician")
        s.flush()
        reader_id = reader.id
        repository.create_study(s, "page study", app_home["cohort"], app_home["model"], ["softcam", "gradcam"],
                                seed=1, images=2)
    at = open_app("study", user={"id": reader_id, "name": "dr_reader", "role": "clinician"})
    assert not at.exception, [e.value for e in at.exception]
    shown = " ".join(texts(at.markdown) + texts(at.caption) + [r.label for r in at.radio] + [b.label for b in at.button])
    titles = " ".join(str(c.proto.spec) for c in at.get("plotly_chart"))
    assert "Map " in titles and "softcam" not in titles.lower() and "grad" not in titles.lower()
    assert "softcam" not in shown.lower() and "grad-cam" not in shown.lower()
    assert at.button(key="study_save").disabled  # until a rating is chosen
    radio = next(r for r in at.radio if r.label.startswith("How plausible"))
    radio.set_value(4).run()
    at.button(key="study_save").click().run()
    assert not at.exception and not at.error, texts(at.error)
    with session_scope(readonly=True) as s:
        answers = repository.answers_table(s, "page study")
    assert len(answers) == 1 and answers.rating.iloc[0] == 4 and answers.reader.iloc[0] == "dr_reader"
    assert answers.seconds.iloc[0] > 0
    assert any("1 of 4 maps rated" in str(p.proto) for p in at.get("progress"))
