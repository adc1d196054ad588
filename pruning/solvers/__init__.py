"""The solvers of :func:`pruning.solve.solve`, one module each: ``exact``, ``cpsat`` and the baselines.

Each registers itself with :func:`pruning.solve.register_solver` and receives the problem reduced to its
prunable groups (:class:`~pruning.solvers.instance.Instance`). The registry imports every module of this
package on its first lookup, so a new solver is one more file here (or in a ``plugins`` module) and one YAML in
``conf/solver/``.
"""
