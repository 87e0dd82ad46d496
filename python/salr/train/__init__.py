"""Fine-tuning the adapters of a converted model: :class:`TrainConfig` (:mod:`.config`), the loop
:func:`train` (:mod:`.loop`), resumable token batches (:mod:`.data`), chat / instruction
data trained on its completions (:mod:`.chat_data`), torch.distributed (DDP / FSDP2,
:mod:`.distributed`) and atomic, verified checkpoints (:mod:`.checkpoint`, :mod:`.state`)."""

from salr.train.chat_data import ChatExamples
from salr.train.config import TrainConfig, lr_factor
from salr.train.data import IterableBatches, TokenWindows
from salr.train.distributed import distributed_context, init_distributed_from_env
from salr.train.loop import train

__all__ = ["ChatExamples", "IterableBatches", "TokenWindows", "TrainConfig", "distributed_context", "init_distributed_from_env",
           "lr_factor", "train"]
