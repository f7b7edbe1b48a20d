"""Stand-in for `lm_eval` in tests: enough for `mlx_lm.evaluate` to import and parse."""


def simple_evaluate(*args, **kwargs):
    raise NotImplementedError("the lm_eval stand-in does not evaluate")
