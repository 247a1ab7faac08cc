"""Adjudication: the clinician study's three annotators' real points on EyePACS 26127_right merged
into a consensus set, with who decided what; evaluation against the consensus; and the Annotate
page's Adjudicate tab driven through AppTest."""

from __future__ import annotations

import pytest

from tests.test_agreement import _study
from tests.test_app_pages import open_app, texts


def _image(session, cohort: str):
    from db import repository

    [image] = repository.images_to_adjudicate(session, cohort)
    return image


def test_consensus_proposals_and_saved_decisions(real_data, db_env, session):
    from db import repository
    from db.agreement import cohort_agreement
    from db.evaluation import cohort_annotators, load_database_cohort

    _study(session, real_data)
    image = _image(session, "study")  # only 26127_right has shapes by two or more annotators
    proposals = repository.consensus_proposals(session, image, tolerance=10)
    # by hand (same label within 10 px, connected through the pairwise matchings):
    #   EX (206,188) (203,189) (204,191): 3 votes; MA (266,371) (265,370) (265,370): 3 votes;
    #   MA (134,346) by 2 and (135,348) by 3: 2 votes (more than half of 3: suggested);
    #   alone: 1's MA (143,376) and HE (135,349), 3's MA (236,365)
    summary = sorted((p.kind, p.label, p.votes, p.suggested) for p in proposals)
    assert summary == sorted([("point", "EX", 3, True), ("point", "MA", 3, True), ("point", "MA", 2, True),
                              ("point", "MA", 1, False), ("point", "HE", 1, False), ("point", "MA", 1, False)])
    assert sum(len(p.annotation_ids) for p in proposals) == 11
    ex = next(p for p in proposals if p.label == "EX")
    assert (ex.geometry.x, ex.geometry.y) == pytest.approx(((206 + 203 + 204) / 3, (188 + 189 + 191) / 3), abs=0.01)
    assert ex.annotators == ("annotator_1", "annotator_2", "annotator_3")

    repository.get_or_create_user(session, "senior", role="annotator")
    accepted = [p for p in proposals if p.suggested]
    rejected = [p for p in proposals if not p.suggested]
    created = repository.save_consensus(session, image, accepted, rejected, "senior")
    assert len(created) == 3 and all(a.author.username == "consensus" and a.provenance == "consensus" for a in created)
    record = repository.adjudication_record(session, image)
    assert sorted(r["decision"] for r in record) == ["accept"] * 3 + ["reject"] * 3
    assert {r["by"] for r in record} == {"senior"}
    assert {r["annotators"] for r in record if r["decision"] == "reject"} == {"annotator_1", "annotator_3"}

    # the consensus is a ground truth to score against, but not an annotator of the agreement
    assert cohort_annotators(session, "study") == ["annotator_1", "annotator_2", "annotator_3", "consensus"]
    cohort = load_database_cohort(session, "study", include_unlabeled=True, annotator="consensus")
    assert sum(len(v) for v in cohort.points_by_image.values()) == 3
    _, agreement = cohort_agreement(session, "study")
    assert agreement.attrs["annotators"] == ["annotator_1", "annotator_2", "annotator_3"]

    # adjudicating again replaces the consensus set; the first decisions stay on record
    again = repository.save_consensus(session, image, accepted[:1], accepted[1:] + rejected, "senior")
    live = [a for a in repository.list_annotations(session, image) if a.provenance == "consensus"]
    assert [a.id for a in live] == [again[0].id]
    assert len(repository.adjudication_record(session, image)) == 3 + 3 + 1 + 5
    # proposals never take the consensus set as an annotator's input
    assert sum(len(p.annotation_ids) for p in repository.consensus_proposals(session, image)) == 11


def test_adjudicate_tab_saves_the_ticked_proposals(app_home, real_data):
    from db import repository
    from db.session import session_scope

    at = open_app("annotate")  # signs the admin in first (user 1), then the study's annotators are created
    with session_scope() as s:
        _study(s, real_data)
    at.run()
    at.selectbox(key="adjudicate_cohort").set_value("study").run()
    assert not at.exception, [e.value for e in at.exception]
    save = at.button(key="adjudicate_save")
    assert save.label == "Save consensus (3 of 6)"
    save.click().run()
    assert not at.exception and not at.error, texts(at.error)
    assert any("3 shape(s) saved, 3 rejected" in t for t in texts(at.success)), texts(at.success)
    with session_scope(readonly=True) as s:
        [image] = repository.images_to_adjudicate(s, "study")
        consensus = [a for a in repository.list_annotations(s, image) if a.provenance == "consensus"]
        record = repository.adjudication_record(s, image)
    assert len(consensus) == 3 and {r["by"] for r in record} == {"admin"}
    decisions = next(d.value for d in at.dataframe if "decision" in d.value.columns)
    assert sorted(decisions["decision"]) == ["accept"] * 3 + ["reject"] * 3
