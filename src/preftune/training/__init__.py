"""Running a training job: the recipe (`recipe.py`: setup, the loop, `run`, the one way a run
starts) and the small components its loop asks: the step plan (`plan.py`), devices, processes and
stop signals (`distributed.py`), metrics logging (`metrics.py`), the run folder (`rundir.py`) and
the checkpointer (`checkpointer.py`)."""
