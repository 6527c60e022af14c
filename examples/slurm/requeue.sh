# Sourced by the sbatch scripts in this folder: run the training step, and requeue the job when the
# trainer stopped early with a checkpoint.
#
# The scripts ask SLURM for SIGUSR1 before the time limit (#SBATCH --signal=USR1@SECONDS: every task of
# the job's steps gets it; choose more seconds than a training step plus a checkpoint save take). The
# trainer then saves at the end of its current step and exits with status 75, as it does on SIGTERM (a
# preemption) or after trainer.exit_after_minutes. run_or_requeue answers 75 with `scontrol requeue`: the
# job (#SBATCH --requeue) keeps its id and appends to its log (#SBATCH --open-mode=append), and the new
# launch finds the checkpoint in its run directory, which must not depend on the job id, and continues
# (checkpoint.resume=auto).
STOPPED_EARLY=75

run_or_requeue() {
  local status=0
  "$@" || status=$?
  if [ "$status" = "$STOPPED_EARLY" ]; then
    echo "training stopped early with a checkpoint: requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  return "$status"
}
