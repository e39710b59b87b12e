"""Where torch work runs: CUDA when present, else CPU."""


import dagster as dg
from pydantic import Field

from afmrl_dagster.devices import resolve_device
from afmrl_dagster.settings import DEFAULT_CHECKPOINTS, DEFAULT_DEVICE, Settings, k8s_gpus_from_env

GPU_POOL = "gpu"  # concurrency pool shared by every asset that runs torch models (limit in dagster.yaml)


def gpu_op_tags(settings: Settings | None = None) -> dict:
    """Tags of the torch assets' steps: with dagster-k8s's ``k8s_job_executor`` each such step
    runs in its own pod requesting ``AFMRL_K8S_GPUS`` GPUs (default 1; 0 requests none).
    Elsewhere the tag is inert. ``settings`` default: read from the environment now."""
    gpus = settings.k8s_gpus if settings is not None else k8s_gpus_from_env()
    if gpus == 0:
        return {}
    return {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}}}


# The one environment read at import (AFMRL_K8S_GPUS only): op tags are fixed when the asset
# modules define their assets (the decorators take them), as the definitions load.
GPU_OP_TAGS = gpu_op_tags()


class TorchCompute(dg.ConfigurableResource):
    """Resolves the torch device and dtype for every torch asset."""

    device: str = Field(default=DEFAULT_DEVICE, description="'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    dtype: str = Field(default="auto", description="'auto' (bfloat16 on CUDA, float32 on CPU), 'float32' or 'bfloat16'.")
    num_threads: int = Field(default=0, description="CPU threads for torch; 0 keeps torch's default.")
    checkpoints: str = Field(
        default=DEFAULT_CHECKPOINTS,
        description="Local folder (a persistent volume in a cluster) where long trainings keep checkpoints: a run killed mid-training "
                    "resumes from its last one when rematerialised with the same inputs (AFMRL_CHECKPOINTS).",
    )

    world_size: int = Field(
        default=1, ge=1,
        description="Processes an encoder training or a generator's SFT runs on (one a GPU; gloo CPU processes without one). Above 1 "
                    "the training asset launches torchrun through Dagster Pipes and trains with PyTorch DDP.",
    )

    def train_on_ranks(self, context, job_folder: str) -> tuple[str, list[dict], list[dict]]:
        """Run the training job in ``job_folder`` (an encoder training or a generator's SFT) on
        ``world_size`` processes: ``torchrun`` through Dagster Pipes (rank 0's log lines and epochs
        come back live). Returns the folder rank 0 saved the model in, its history and the epochs
        reported; dg.Failure naming the ranks that stopped otherwise."""
        import os
        import sys

        from afmrl_dagster.training.training_job import RESULT_DIR, failure_summary, read_history

        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc-per-node={self.world_size}",
                   "-m", "afmrl_dagster.apps.train_worker", job_folder]
        context.log.info(f"launching {self.world_size} training processes: {' '.join(command[1:])}")
        try:
            invocation = dg.PipesSubprocessClient().run(command=command, context=context)
        except Exception as error:  # Pipes' error when torchrun exits non-zero (a rank failed or was killed)
            raise dg.Failure(
                description=f"distributed training failed ({self.world_size} processes): {failure_summary(job_folder, self.world_size)}. "
                            f"Rematerialise to resume from its last checkpoint.",
                metadata={"job_folder": job_folder, "launcher_error": str(error)[:2000]},
            ) from error
        epochs = [message["epoch"] for message in invocation.get_custom_messages() if isinstance(message, dict) and "epoch" in message]
        return os.path.join(job_folder, RESULT_DIR), read_history(job_folder), epochs

    def checkpoint_dir(self, asset: str, key: str) -> str:
        """The checkpoint folder of one training: ``<checkpoints>/<asset>/<input fingerprint>``, so a rerun
        on the same inputs and configuration finds it and any other never does."""
        import os

        return os.path.join(self.checkpoints, asset, key)

    def discard_checkpoints(self, asset: str, key: str) -> None:
        """Remove a training's checkpoints once its model is published (the artefact is what is kept)."""
        import shutil

        shutil.rmtree(self.checkpoint_dir(asset, key), ignore_errors=True)

    def torch_device(self) -> str:
        """The device ``device`` names on this machine (:func:`afmrl_dagster.devices.resolve_device`)."""
        return resolve_device(self.device)

    def torch_dtype(self):
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().startswith("cuda") else torch.float32
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.dtype]

    def setup_for_execution(self, context) -> None:
        if self.num_threads:
            import torch

            torch.set_num_threads(self.num_threads)
