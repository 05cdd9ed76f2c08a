"""The project's own tables beside Optuna's, in the same database.

They hold the fold assignment, per-fold results and per-epoch histories, keyed
by study name and Optuna trial number, so pandas can read them with plain SQL.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import DateTime, Float, Integer, String, Text, UniqueConstraint, create_engine, delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

logger = logging.getLogger(__name__)

METRICS = ("loss", "accuracy", "balanced_accuracy", "auc")


class Base(DeclarativeBase):
    pass


class StudyDataModel(Base):
    """The data a study was started on; a later run on other data is rejected."""

    __tablename__ = "sweep_studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_name: Mapped[str] = mapped_column(String(512), unique=True)
    data_fingerprint: Mapped[str] = mapped_column(String(64))
    n_samples: Mapped[int] = mapped_column(Integer)
    n_folds: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    class_names: Mapped[str] = mapped_column(Text)
    config_yaml: Mapped[str] = mapped_column(Text)
    doctor_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class FoldAssignmentModel(Base):
    """The validation fold of each sample, computed once from study.seed."""

    __tablename__ = "sweep_fold_assignments"
    __table_args__ = (UniqueConstraint("study_name", "sample_index"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_name: Mapped[str] = mapped_column(String(512), index=True)
    sample_index: Mapped[int] = mapped_column(Integer)
    fold: Mapped[int] = mapped_column(Integer)
    label: Mapped[int] = mapped_column(Integer)
    group_id: Mapped[str | None] = mapped_column(String(512), nullable=True)


class _MetricColumns:
    """Loss, accuracy, balanced accuracy and ROC AUC on the training and validation images."""

    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    train_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    train_balanced_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    train_auc: Mapped[float | None] = mapped_column(Float, nullable=True)
    val_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    val_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    val_balanced_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    val_auc: Mapped[float | None] = mapped_column(Float, nullable=True)


class FoldResultModel(_MetricColumns, Base):
    """Final metrics of one fold of one trial (after the last phase 2 epoch)."""

    __tablename__ = "sweep_fold_results"
    __table_args__ = (UniqueConstraint("study_name", "trial_number", "fold"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_name: Mapped[str] = mapped_column(String(512), index=True)
    trial_number: Mapped[int] = mapped_column(Integer)
    fold: Mapped[int] = mapped_column(Integer)
    n_train: Mapped[int] = mapped_column(Integer)
    n_val: Mapped[int] = mapped_column(Integer)
    epochs_run: Mapped[int] = mapped_column(Integer)
    best_epoch: Mapped[int] = mapped_column(Integer)
    duration_s: Mapped[float] = mapped_column(Float)
    flags: Mapped[str] = mapped_column(Text, default="")  # health flags, comma-separated
    confusion: Mapped[str | None] = mapped_column(Text, nullable=True)  # validation confusion matrix as JSON rows


class EpochModel(_MetricColumns, Base):
    """Metrics after one epoch of one fold; ``epoch`` counts both phases from 1."""

    __tablename__ = "sweep_epochs"
    __table_args__ = (UniqueConstraint("study_name", "trial_number", "fold", "epoch"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_name: Mapped[str] = mapped_column(String(512), index=True)
    trial_number: Mapped[int] = mapped_column(Integer)
    fold: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    phase: Mapped[int] = mapped_column(Integer)
    learning_rate: Mapped[float] = mapped_column(Float)
    duration_s: Mapped[float] = mapped_column(Float)


class PredictionModel(Base):
    """Out-of-fold class probabilities of one sample in one trial, as a JSON list."""

    __tablename__ = "sweep_predictions"
    __table_args__ = (UniqueConstraint("study_name", "trial_number", "sample_index"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_name: Mapped[str] = mapped_column(String(512), index=True)
    trial_number: Mapped[int] = mapped_column(Integer)
    fold: Mapped[int] = mapped_column(Integer)
    sample_index: Mapped[int] = mapped_column(Integer)
    label: Mapped[int] = mapped_column(Integer)
    probabilities: Mapped[str] = mapped_column(Text)


class Store:
    """Access to the sweep tables of one database.

    Args:
        url: SQLAlchemy URL, the same as Optuna's storage.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = create_engine(url)
        Base.metadata.create_all(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Open a session that commits on success and rolls back on any error."""
        session = Session(self.engine)
        try:
            yield session
            session.commit()
        except Exception:
            session.rollback()
            raise
        finally:
            session.close()

    def save_assignment(
        self,
        study_name: str,
        assignment: np.ndarray,
        labels: np.ndarray,
        groups: np.ndarray | None,
        *,
        fingerprint: str,
        seed: int,
        class_names: tuple[str, ...],
        config_yaml: str,
        doctor_json: str | None = None,
    ) -> None:
        """Store the data fingerprint and the fold of every sample, once per study."""
        with self.session() as session:
            session.add(
                StudyDataModel(
                    study_name=study_name,
                    data_fingerprint=fingerprint,
                    n_samples=len(assignment),
                    n_folds=int(assignment.max()) + 1,
                    seed=seed,
                    class_names="\n".join(class_names),
                    config_yaml=config_yaml,
                    doctor_json=doctor_json,
                    created_at=datetime.now(UTC),
                )
            )
            session.add_all(
                FoldAssignmentModel(
                    study_name=study_name,
                    sample_index=index,
                    fold=int(fold),
                    label=int(labels[index]),
                    group_id=None if groups is None else str(groups[index]),
                )
                for index, fold in enumerate(assignment)
            )

    def load_assignment(self, study_name: str) -> tuple[StudyDataModel, np.ndarray] | None:
        """Return the study's data record and fold assignment, or None before the first run."""
        with self.session() as session:
            record = session.scalars(select(StudyDataModel).where(StudyDataModel.study_name == study_name)).first()
            if record is None:
                return None
            rows = session.execute(
                select(FoldAssignmentModel.sample_index, FoldAssignmentModel.fold)
                .where(FoldAssignmentModel.study_name == study_name)
                .order_by(FoldAssignmentModel.sample_index)
            ).all()
            session.expunge(record)
        return record, np.asarray([fold for _, fold in rows], dtype=np.int64)

    def save_epoch(self, study_name: str, trial_number: int, fold: int, **values: float | int) -> None:
        """Store one epoch's metrics, replacing a row left by an earlier attempt."""
        with self.session() as session:
            session.execute(
                delete(EpochModel).where(
                    EpochModel.study_name == study_name,
                    EpochModel.trial_number == trial_number,
                    EpochModel.fold == fold,
                    EpochModel.epoch == values["epoch"],
                )
            )
            session.add(EpochModel(study_name=study_name, trial_number=trial_number, fold=fold, **values))

    def save_fold(self, study_name: str, trial_number: int, fold: int, **values: float | int | str | None) -> None:
        """Store one fold's final metrics."""
        with self.session() as session:
            session.add(FoldResultModel(study_name=study_name, trial_number=trial_number, fold=fold, **values))

    def save_predictions(self, study_name: str, trial_number: int, fold: int, indices: np.ndarray, labels: np.ndarray, probabilities: np.ndarray) -> None:
        """Store the validation probabilities of one fold, one row per sample."""
        with self.session() as session:
            session.add_all(
                PredictionModel(
                    study_name=study_name,
                    trial_number=trial_number,
                    fold=fold,
                    sample_index=int(index),
                    label=int(label),
                    probabilities=json.dumps([round(float(p), 6) for p in row]),
                )
                for index, label, row in zip(indices, labels, probabilities, strict=True)
            )

    def dispose(self) -> None:
        """Close the engine's connections."""
        self.engine.dispose()
