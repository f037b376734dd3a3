"""The Transformers ``Trainer`` for head-only training: checkpoints hold the head, not a copy of the base."""

from __future__ import annotations

import logging

from transformers import Trainer

from .errors import BackattnValueError

logger = logging.getLogger(__name__)


class HeadTrainer(Trainer):
    """A ``Trainer`` whose saves write the active head alone (``save_head``: config, safetensors, model card).

    Checkpoints therefore hold the head, the optimiser state of the head's parameters and the usual trainer
    state; resuming (``resume_from_checkpoint``) and loading the best model put the saved weights back into
    the resident head in place. Everything else (distribution through ``accelerate launch``, logging,
    evaluation, progress bars) is the stock ``Trainer``. ``head_metadata`` (for example the prompt template)
    is recorded in every saved head.
    """

    def __init__(self, *args, head_metadata: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_metadata = head_metadata or {}

    def train(self, *args, **kwargs):
        """``Trainer.train``, refused at once when no head would be trained (no active head, heads disabled,
        or the active head frozen): the stock Trainer would fail later, on an empty optimiser or at backward."""
        heads = getattr(self._head_model(), "heads", None)
        problem = heads.training_problem() if hasattr(heads, "training_problem") else None
        if problem is not None:
            raise BackattnValueError(f"HeadTrainer has no head to train: {problem}.")
        return super().train(*args, **kwargs)

    def _head_model(self, model=None):
        return self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        logger.info("Saving the head to %s", output_dir)
        self._head_model().save_head(output_dir, metadata=self.head_metadata)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_head_from(self, checkpoint: str, model=None) -> None:
        model = self._head_model(model)
        model.load_head(checkpoint, head_name=model.config.active_head, hotswap=True)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_head_from(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        logger.info("Loading the best head from %s", self.state.best_model_checkpoint)
        self._load_head_from(self.state.best_model_checkpoint)
