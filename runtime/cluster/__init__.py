"""The process layer: TaskManager processes, their control connection to the JobManager, and
where they are placed.

- :mod:`runtime.cluster.placement`: starts and stops TaskManagers (:class:`TaskManagerPlacement`;
  :class:`LocalProcessPlacement` runs them as child processes of this machine);
  :mod:`runtime.cluster.ray`: as Ray actors (``--cluster ray``, an optional extra).
- :mod:`runtime.cluster.jobmanager`: the JobManager's side of the control connections
  (:class:`TaskManagerPool`: start, registration, heartbeats, loss, replacement, shutdown).
- :mod:`runtime.cluster.taskmanager`: a TaskManager's side (:func:`run_taskmanager`, behind
  ``python -m runtime taskmanager``).
- :mod:`runtime.cluster.jobspec`: what a TaskManager needs to build the job graph itself, and the
  fingerprint that proves it built the same one; :mod:`runtime.cluster.messages`: the messages of
  the control connection that concern the TaskManager itself and the deployment of its subtasks.
- :mod:`runtime.cluster.deployment`: the job master's
  :class:`~runtime.master.deployment.Deployment` onto TaskManagers (``--taskmanagers N``); and
  :mod:`runtime.cluster.tasks`: the subtasks a TaskManager runs.

Failure handling is the job master's: this layer detects a lost TaskManager and says so, and
replaces it when asked. The data plane (``actors/``) never goes through the placement.
"""
