"""The database operations the Streamlit pages, the service layer and the CLI call, by aggregate.

Every function takes a ``Session`` (from :func:`db.session.session_scope`) and leaves committing to
the caller, so a page action or a CLI command is one transaction: all of it happens or none of it.
Annotations are :mod:`annotations.geometry` objects in image pixels; every change to one writes an
audit row and carries the version the user started from (:class:`ConflictError` instead of
overwriting someone else's change).

Modules: ``base`` (errors), ``users``, ``cohorts``, ``images``, ``annotation_edits``,
``annotation_files`` (import / export), ``labels`` (image classes, splits, their history), ``models``, ``maps`` (cached maps), ``metric_results``,
``jobs``. ``from db import repository`` gives all of them, as one namespace.
"""

from db.repository.annotation_edits import (  # noqa: F401
    annotation_geometry,
    annotation_history,
    delete_annotation,
    list_annotations,
    next_unannotated_image,
    restore_annotation,
    save_annotation,
)
from db.repository.annotation_files import (  # noqa: F401
    AnnotationImportResult,
    CohortResolver,
    export_annotations,
    export_dicom_seg,
    export_dicom_sr,
    export_images,
    import_annotations,
)
from db.repository.base import (  # noqa: F401
    AnnotationImportError,
    ConflictError,
    JobFinishedError,
    NotFoundError,
    Progress,
    RepositoryError,
)
from db.repository.cohorts import (  # noqa: F401
    add_cohort,
    ensure_label,
    get_cohort,
    list_cohorts,
    set_class_labels,
)
from db.repository.images import (  # noqa: F401
    AcceptedImage,
    IMAGE_SUFFIXES,
    ImageImportResult,
    RejectedImage,
    count_images,
    get_image,
    image_path,
    import_images,
    list_images,
    names_key,
    pseudonym_for,
    release_image,
)
from db.repository.adjudication import (  # noqa: F401
    CONSENSUS_USER,
    Proposal,
    adjudication_record,
    consensus_proposals,
    images_to_adjudicate,
    save_consensus,
)
from db.repository.reader_studies import (  # noqa: F401
    answers_table,
    create_study,
    get_study,
    list_studies,
    reader_items,
    record_answer,
)
from db.repository.labels import (  # noqa: F401
    LabelImportError,
    LabelImportResult,
    assign_splits,
    import_labels,
    label_change_counts,
    label_counts,
    label_history,
    read_label_rows,
    set_image_label,
)
from db.repository.jobs import (  # noqa: F401
    cancel_job,
    close_interrupted_jobs,
    create_job,
    get_job,
    list_jobs,
    this_worker,
    update_job,
    worker_alive,
)
from db.repository.maps import (  # noqa: F401
    cache_map,
    get_cached_map,
    params_hash,
)
from db.repository.metric_results import (  # noqa: F401
    list_metric_results,
    save_metric_results,
)
from db.repository.models import (  # noqa: F401
    get_default_model,
    get_model,
    list_models,
    register_model,
    set_default_model,
)
from db.repository.users import (  # noqa: F401
    check_password,
    create_user,
    get_or_create_user,
    get_user,
    hash_password,
    list_users,
    set_password,
    verify_password,
)
