"""The Transformers ``Trainer`` for head-only training: checkpoints hold the head, not a copy of the base."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import Trainer

from .errors import BackattnValueError
from .head_files import MODEL_CARD_NAME, is_backattn_card
from .query_standardization import fit_for_a_fresh_run

logger = logging.getLogger(__name__)


class HeadTrainer(Trainer):
    """A ``Trainer`` whose saves write the active head alone (``save_head``: config, safetensors, model card).

    Checkpoints therefore hold the head, the optimiser state of the head's parameters and the usual trainer
    state; resuming (``resume_from_checkpoint``) and loading the best model put the saved weights back into
    the resident head in place. Everything else (distribution through ``accelerate launch``, logging,
    evaluation, progress bars) is the stock ``Trainer``. ``head_metadata`` (for example the prompt template)
    is recorded in every saved head. The head's model card stays the card of ``output_dir`` (``push_to_hub``
    uploads it; see :meth:`create_model_card`). Parameters outside the heads must be frozen, as checkpoints
    would not hold them: a LoRA and a head train together under the stock ``Trainer`` (see the README).
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
        others = [
            name
            for name, parameter in self._head_model().named_parameters()
            if parameter.requires_grad and not (name.startswith("heads.") or ".heads." in name)
        ]
        if others:
            raise BackattnValueError(
                f"HeadTrainer saves and resumes the head alone, but {len(others)} other parameter(s) train too "
                f"(e.g. {others[0]}: a LoRA adapter on the base?), and their training would be lost at every "
                "checkpoint. Train a LoRA and a head together with transformers.Trainer (or TRL's SFTTrainer): "
                "save_pretrained keeps the adapter and every head. Or freeze them (model.freeze_base())."
            )
        fit_for_a_fresh_run(self, self._head_model(), args, kwargs)  # standardize_query_state's statistics
        return super().train(*args, **kwargs)

    def create_model_card(self, *args, **kwargs) -> None:
        """``Trainer.create_model_card`` (which ``push_to_hub`` calls), except that the head's own model card, as
        ``save_head`` wrote it into ``output_dir``, is kept: the Trainer's generic card would replace it."""
        directory = Path(self.args.output_dir)
        if is_backattn_card(directory):
            logger.info("Keeping the head's model card %s", directory / MODEL_CARD_NAME)
            return
        super().create_model_card(*args, **kwargs)

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
