"""The training loop: the book's ``train_model_simple`` (chapter 5) grown nanoGPT's options. Never prints.

``Trainer(run)`` builds what the loop needs (batches, training kernels, AdamW, the resumed place, the
torch.compile and DDP wrappers); ``Trainer.events()`` is one flat loop that yields plain dicts, the
same objects ``train.jsonl`` holds: ``start``, ``step`` (progress only, not logged), ``eval``,
``sample``, ``checkpoint`` and ``end``. The CLI renders them.

Options beyond the book: gradient accumulation, clipping, warm-up plus cosine learning rate, weight
decay on 2-D weights only, bfloat16 autocast, torch.compile and DistributedDataParallel under
torchrun. With the book's recipe it draws from the global RNG in the book's order (init, each
DataLoader pass, dropout), so the figures are the book's.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from gptcli.errors import UserError
from gptcli.training.distributed import barrier, mean_across
from gptcli.training.optimizer import learning_rate, make_optimizer
from gptcli.training import run_folder
from gptcli.training.run_folder import BEST_DIR
from gptcli.training.setup import Run, check_data
from gptcli.training.state import STATE_FILE, Position, restore_optimizer, restore_position, write_state

if TYPE_CHECKING:
    import torch

    from gptcli.kernels.train import TrainPlan
    from gptcli.training.data import Batches


def autocast(device: "torch.device", dtype: str):
    """bfloat16/float16 autocast (float32 weights and AdamW state), or nothing for float32."""
    import torch

    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def batch_loss(model, x: "torch.Tensor", y: "torch.Tensor", *, device: "torch.device", dtype: str,
               plan: "TrainPlan | None" = None, head_weight: "torch.Tensor | None" = None) -> "torch.Tensor":
    """The book's calc_loss_batch: mean cross-entropy over every position of the batch whose target is
    not -100 (PyTorch's ignore_index: padding and, with --mask-prompt, the prompt of an instruction example).

    ``model`` may be wrapped (torch.compile, DDP). When training with a plan whose ``head_loss`` is
    on, the output head (``head_weight``) and the cross-entropy run as one chunked function
    (``gptcli.kernels.train.head_loss``) after the model's blocks; evaluation (no grad) takes the plain route.
    """
    import torch
    import torch.nn.functional as F

    x, y = x.to(device), y.to(device)
    attention = None
    if plan is not None and torch.is_grad_enabled():
        from gptcli.kernels.train import attention_for

        attention = attention_for(plan)
    if plan is not None and plan.head_loss and head_weight is not None and torch.is_grad_enabled():
        from gptcli.kernels.train import head_loss

        with autocast(device, dtype):
            hidden = model(x, head=False, attention=attention)  # (B, T, emb_dim)
        hidden, targets = hidden.flatten(0, 1), y.flatten()
        kept = targets != -100
        if not bool(kept.all()):  # head_loss has no ignore_index: leave those rows out of the mean
            hidden, targets = hidden[kept], targets[kept]
        return head_loss(hidden.float(), head_weight, targets, dtype=getattr(torch, dtype),
                         onednn=plan.linear == "onednn" and hidden.device.type == "cpu")
    with autocast(device, dtype):
        logits = model(x, attention=attention)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


class Trainer:
    """Trains ``run``: ``events()`` yields what happens; ``request_stop()`` (Ctrl-C) ends it after the
    current step with a checkpoint. ``plan`` overrides the training kernels (benchmarks)."""

    def __init__(self, run: Run, plan: "TrainPlan | None" = None):
        from gptcli.kernels import train as train_kernels

        self.run, self.settings, self.model = run, run.settings, run.model
        s = run.settings
        self._stop = False
        self.step_tokens = 0  # the last optimizer step's input tokens
        self.saving = False  # a checkpoint is being written (see save)
        self.total_steps, self.steps_per_epoch = self.plan_steps()
        if run.resume_state is not None and run.resume_state.position.step >= self.total_steps:
            done = run.resume_state.position.step
            raise UserError(f"the run in {run.out} already finished its {done} steps; pass --max-steps (or "
                            f"--epochs) beyond that to continue it")
        self.batches = self.make_batches()
        rows = max(1, s.batch_size // run.dist.world) * self.tokens_per_row()  # a micro-batch's, in this process
        self.plan = plan or train_kernels.plan(run.device, self.model, rows)
        train_kernels.prepare(self.model, self.plan)
        self.optimizer = make_optimizer(self.model, s, self.plan)
        self.position = Position()
        if run.resume_state is not None:
            restore_optimizer(self.optimizer, run.resume_state)
            self.position = restore_position(run.resume_state, self.batches)
        self.train_model = train_kernels.compile_for_training(self.model) if s.compile else self.model
        if run.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [run.device.index] if run.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.train_model, device_ids=ids)

    # What a task changes (gptcli.training.classify's ClassifyTrainer overrides these): the steps, the
    # batches, the loss of a batch, the evaluation's figures, the events at an epoch's end and after the
    # last step, and the weights a checkpoint writes.

    def plan_steps(self) -> tuple[int, int | None]:
        """(total optimizer steps, steps per epoch or None)."""
        if self.settings.task == "instruct":  # gptcli.training.instruct's data plans its own steps and batches
            return self.run.task_data.plan_steps(self.settings)
        return check_data(self.run.train_ids, self.run.val_ids, self.settings, self.model.cfg.context_length)

    def make_batches(self) -> "Batches":
        import torch

        from gptcli.training.data import make_batches

        s, cfg, run = self.settings, self.model.cfg, self.run
        if s.task == "instruct":
            return run.task_data.batches(s, torch.Generator().manual_seed(s.seed), rank=run.dist.rank,
                                         world=run.dist.world)
        return make_batches(s.sampling, run.train_ids, run.val_ids, length=cfg.context_length,
                            stride=s.stride or cfg.context_length, batch_size=s.batch_size, grad_accum=s.grad_accum,
                            seed=s.seed, rank=run.dist.rank, world=run.dist.world)

    def tokens_per_row(self) -> int:
        """A bound on a batch row's length (the rows the training kernels are measured at)."""
        if self.settings.task == "instruct":
            return self.run.task_data.longest_row()
        return self.model.cfg.context_length

    def epoch_end_events(self, step: int, epoch: int) -> Iterator[dict]:
        return iter(())

    def end_metrics(self) -> dict:
        return {}

    def state_extra(self) -> dict[str, str]:
        """Metadata a task adds to the state file (what rebuilding its model needs)."""
        import json

        from gptcli.adapters import BASE_KEY

        return {BASE_KEY: json.dumps(self.run.base)} if self.run.base is not None else {}

    def save_weights(self, folder: Path, metadata: dict[str, str] | None = None) -> None:
        """The run's weights: the Hugging Face layout, or the adapters alone for a --lora run; with the
        run's own metadata (an instruct run's template) and ``metadata``."""
        from gptcli.export import save_pretrained

        metadata = {**self.run.metadata, **(metadata or {})}

        if self.settings.lora:
            from gptcli.adapters import save_adapters
            from gptcli.run_layout import ADAPTERS_FILE

            folder.mkdir(parents=True, exist_ok=True)
            save_adapters(self.model, folder / ADAPTERS_FILE, self.run.tokenizer, rank=self.settings.lora,
                          alpha=self.settings.lora_alpha, base=self.run.base, metadata=metadata)
        else:
            save_pretrained(self.model, folder, self.run.tokenizer, metadata)

    def request_stop(self) -> None:
        self._stop = True

    def loss(self, model, x: "torch.Tensor", y: "torch.Tensor") -> "torch.Tensor":
        return batch_loss(model, x, y, device=self.run.device, dtype=self.settings.dtype, plan=self.plan,
                          head_weight=self.model.out_head.weight)

    def optimizer_step(self, lr: float) -> float:
        """One optimizer step at ``lr``: ``grad_accum`` micro-batches, gradients averaged; the mean loss."""
        import torch

        s = self.settings
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        self.step_tokens = 0  # the inputs' tokens, over all processes (the book's tokens_seen)
        for micro in range(s.grad_accum):
            batch = self.batches.next()
            self.step_tokens += batch[0].numel() * self.run.dist.world
            sync = micro == s.grad_accum - 1 or self.run.dist.world == 1
            with self.train_model.no_sync() if not sync else contextlib.nullcontext():
                loss = self.loss(self.train_model, *batch)
                (loss / s.grad_accum).backward()
            step_loss += loss.item() / s.grad_accum
        if s.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        self.optimizer.step()
        return mean_across(step_loss, self.run.device) if self.run.dist.world > 1 else step_loss

    def evaluate(self) -> dict[str, float]:
        """The book's evaluate_model: mean loss over ``eval_batches`` batches of each split, in eval mode:
        ``{"train_loss", "val_loss"}``."""
        import torch

        self.model.eval()
        out = {}
        with torch.no_grad():
            for split in ("train", "val"):
                losses = [self.loss(self.model, *batch).item()
                          for batch in self.batches.evaluation(split, self.settings.eval_batches)]
                out[f"{split}_loss"] = sum(losses) / len(losses)
        self.model.train()
        return out

    def sample(self) -> dict:
        """A continuation of the sample prompt, drawn as the settings say: greedy (the book's
        generate_and_print_sample) or sampled with a fixed seed (nanoGPT's sample.py). The samples'
        generator is their own, so sampling never moves the training's random numbers."""
        from gptcli.decoding.generate import Decoder, Generation, prompt_ids

        model, tok, s = self.model, self.run.tokenizer, self.settings
        model.eval()
        ids = prompt_ids(s.sample_prompt or "", tok)
        options = s.sampling_options()
        gen = Generation(Decoder(model, self.run.device, next(model.parameters()).dtype), ids, options,
                         eos_id=tok.eot_id, token_bytes=tok.token_bytes, context_length=model.cfg.context_length)
        gen.run()
        model.train()
        return {"prompt": s.sample_prompt, "text": gen.text, "token_ids": gen.token_ids,
                "temperature": options.temperature, "top_k": options.top_k,
                "seed": None if options.greedy else options.seed}

    def save(self) -> Path:
        """Write state.safetensors (all that resuming needs), then the last weights' export.

        ``saving`` is set meanwhile, so a signal handler can let the save finish (each file is written
        to a temporary name and renamed: stopping in the middle would keep the previous one, but a
        run with no checkpoint yet would have none). A write that fails (a full disk) is a UserError
        that names the last good checkpoint."""
        run = self.run
        self.saving = True
        try:
            with run_folder.writing(run.out, "the checkpoint"):
                write_state(run.out / STATE_FILE, self.model, self.optimizer, settings=self.settings,
                            tokenizer=run.tokenizer, position=self.position, batches=self.batches,
                            weights_source=run.weights_source, data_digest=run.data_digest,
                            world_size=run.dist.world, extra=self.state_extra())
                self.save_weights(run.out)
        finally:
            self.saving = False
        return run.out

    def _save_best(self, step: int, val_loss: float) -> None:
        self.position.best_val = val_loss
        if self.run.dist.main:
            with run_folder.writing(self.run.out, f"the best weights ({BEST_DIR}/)"):
                self.save_weights(self.run.out / BEST_DIR, {"gptcli.step": str(step), "gptcli.val_loss": repr(val_loss)})

    def _checkpoint(self, step: int) -> Iterator[dict]:
        if self.run.dist.main:
            yield {"event": "checkpoint", "step": step, "path": str(self.save())}
        barrier(self.run.dist)

    def _sample_due(self, step: int, epoch_end: bool, last: bool) -> bool:
        s = self.settings
        if s.sample_prompt is None or s.sample_tokens <= 0 or not self.run.dist.main:
            return False
        if s.sample_every == "epoch":
            return epoch_end
        return isinstance(s.sample_every, int) and s.sample_every > 0 and (
            (step and step % s.sample_every == 0) or last)

    def start_event(self) -> dict:
        import torch

        run, cfg = self.run, self.model.cfg
        return {"event": "start", "step": self.position.step, "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch, "train_tokens": len(run.train_ids),
                "val_tokens": len(run.val_ids), "params": sum(p.numel() for p in self.model.parameters()),
                "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                "task": self.settings.task,
                "config": cfg.to_dict(), "tokenizer": run.tokenizer.name, "vocab_size": run.tokenizer.vocab_size,
                "weights": run.weights_source, "device": str(run.device), "world_size": run.dist.world,
                "threads": torch.get_num_threads(), "settings": self.settings.to_dict(), "kernels": self.plan.to_dict(),
                "resumed": run.resume_state is not None, **self._examples()}

    def _examples(self) -> dict:
        """A task's example counts, for the start event (--task instruct)."""
        data = self.run.task_data
        if self.settings.task != "instruct":
            return {}
        return {"examples": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
                "max_length": data.max_length, "mask_prompt": data.mask_prompt, "truncated": data.truncated}

    def events(self) -> Iterator[dict]:
        """The loop: optimizer steps until ``total_steps``, evaluating, sampling and saving on schedule."""
        s, pos, total = self.settings, self.position, self.total_steps
        yield self.start_event()
        start_time, session_tokens, saved_step = time.perf_counter(), 0, pos.step
        self.model.train()
        reason = "done"
        while pos.step < total:
            if self._stop:
                reason = "interrupted"
                break
            lr = learning_rate(pos.step, s, total)
            epoch_of_step = pos.epoch
            loss = self.optimizer_step(lr)
            pos.tokens_seen += self.step_tokens
            session_tokens += self.step_tokens
            done_step = pos.step  # 0-based index of the step just taken
            pos.step += 1
            epoch_end = self.batches.epoch_done()
            pos.epoch += epoch_end
            if self.steps_per_epoch is not None:
                shown_epoch = epoch_of_step + 1
            else:
                shown_epoch = pos.tokens_seen // max(1, len(self.run.train_ids)) + 1
            elapsed = time.perf_counter() - start_time
            yield {"event": "step", "step": done_step, "epoch": shown_epoch, "loss": loss, "lr": lr,
                   "tokens_seen": pos.tokens_seen, "tokens_per_s": session_tokens / elapsed if elapsed > 0 else None,
                   "total_steps": total}

            last = pos.step == total
            scheduled = done_step % s.eval_every == 0
            if scheduled or last:
                metrics = self.evaluate()
                # "final": the evaluation after the last step, off the --eval-every schedule (the book's
                # loop has none; its printed lines are the scheduled ones).
                yield {"event": "eval", "step": done_step, "epoch": shown_epoch, "tokens_seen": pos.tokens_seen,
                       **metrics, "lr": lr, "final": not scheduled}
                if metrics["val_loss"] < pos.best_val:
                    self._save_best(done_step, metrics["val_loss"])
            if self._sample_due(done_step, epoch_end, last):
                yield {"event": "sample", "step": done_step, "epoch": shown_epoch, **self.sample()}
            if epoch_end:
                yield from self.epoch_end_events(done_step, shown_epoch)
            if (s.save_every and done_step and done_step % s.save_every == 0) or last or self._stop:
                saved_step = pos.step
                yield from self._checkpoint(done_step)
        if reason == "interrupted" and saved_step != pos.step:  # stopped between a step's save check and the next
            yield from self._checkpoint(pos.step - 1)
        wall = time.perf_counter() - start_time
        yield {"event": "end", "step": pos.step - 1, "reason": reason, "wall_s": round(wall, 3),
               "tokens_per_s": round(session_tokens / wall, 1) if wall > 0 else None,
               "best_val_loss": None if math.isinf(pos.best_val) else pos.best_val,
               **(self.end_metrics() if reason == "done" else {})}
