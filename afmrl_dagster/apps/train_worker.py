"""One rank of a distributed training: ``torchrun ... -m afmrl_dagster.apps.train_worker JOB``.

The ``agcl_encoder`` and ``attribute_generator`` assets start ``torchrun`` through Dagster
Pipes with the job folder they wrote (:mod:`afmrl_dagster.training.training_job`): an
encoder training or a generator's SFT. Every rank joins the process group, reads the job and
trains (DDP, :mod:`afmrl_dagster.training.distributed`); rank 0 reports the epochs back
through Pipes (log lines, and one custom message per epoch that the asset logs to MLflow),
writes the checkpoints and leaves the trained model in ``JOB/result``. Each rank
marks ``running``, ``done`` or ``failed: ...`` in ``JOB/rank-<r>.status``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="afmrl_dagster.apps.train_worker", description=__doc__.splitlines()[0])
    parser.add_argument("job", help="the job folder the launching asset wrote")
    args = parser.parse_args(argv)

    from ..storage import read_uri_bytes
    from ..training.distributed import barrier, init_from_environment
    from ..training.training_job import RESULT_DIR, EncoderJob, mark, read_job, write_history

    job = read_job(args.job, read_bytes=read_uri_bytes)
    settings = job.config if isinstance(job, EncoderJob) else job
    if settings.device.startswith("cuda"):
        settings.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU a rank
    rank, world_size = init_from_environment(settings.device)
    mark(args.job, rank, "running")
    label = "encoder" if isinstance(job, EncoderJob) else "SFT"
    reporting = contextlib.nullcontext()
    if rank == 0 and "DAGSTER_PIPES_CONTEXT" in os.environ:
        from dagster_pipes import open_dagster_pipes

        reporting = open_dagster_pipes()
    try:
        with reporting as pipes:
            def on_epoch(row: dict) -> None:
                if pipes is not None:
                    pipes.log.info(f"{label} epoch {row['epoch']}: loss {row['loss']:.4f} ({world_size} ranks)")
                    pipes.report_custom_message({"epoch": row})

            if pipes is not None:
                what = job.backend if isinstance(job, EncoderJob) else f"the {job.generator} generator's SFT"
                pipes.log.info(f"training {what} on {len(job.inputs)} listings over {world_size} ranks ({settings.device})")
            model, history = train(job, on_epoch)
            if rank == 0:
                model.save(os.path.join(args.job, RESULT_DIR))
                write_history(args.job, history)
            barrier()
    except BaseException as error:
        mark(args.job, rank, f"failed: {type(error).__name__}: {error}"[:2000])
        traceback.print_exc(file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    mark(args.job, rank, "done")
    return 0


def train(job, on_epoch):
    """(the trained model, which has ``save(folder)``; its history) of either task."""
    from ..training.training_job import EncoderJob

    if isinstance(job, EncoderJob):
        from ..encoders.backends import EncoderBackend
        from ..training.encoder_training import train_backend_encoder

        result = train_backend_encoder(EncoderBackend.parse(job.backend), job.inputs, job.product_ids, job.product_lines,
                                       job.attribute_texts, job.config, on_epoch=on_epoch, **job.options)
        return result.encoder, result.history
    from ..training.generator_backends import distill_writer

    return distill_writer(job.generator, job.inputs, job.targets, job.compact, job.hf, job.device, on_epoch=on_epoch,
                          checkpoint=job.checkpoint)


if __name__ == "__main__":
    raise SystemExit(main())
