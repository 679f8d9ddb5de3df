"""Dataset curation: raw sources -> one versioned, multi-task instruction data set.

Readers (:mod:`.loaders`) and the record types they share (:mod:`.records`), regex cleaning
(:mod:`.cleaning`), dedup (:mod:`.dedup`), instruction templates (:mod:`.templates`), the run itself
(:mod:`.build`), storage and versions (:mod:`.store`), the data card (:mod:`.card`) and MLflow
logging (:mod:`.tracking`).

Other stages only need :func:`load_curated`::

    from tasks.data import load_curated
    splits = load_curated(cfg.home)          # DatasetDict: train, validation, test (LATEST version)
"""

from tasks.data.records import DataError
from tasks.data.store import load_curated, read_card, read_latest, version_dir

__all__ = ["DataError", "load_curated", "read_card", "read_latest", "version_dir"]
