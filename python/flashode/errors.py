"""Exceptions raised by flashode's solvers."""


class SolverError(RuntimeError, AssertionError):
    """A solve could not continue (step-size underflow, max_num_steps, non-finite values).

    The message names the time reached and the step size. It is also an AssertionError because
    torchdiffeq reports the same conditions with `assert`, and code written for torchdiffeq may
    catch them that way.
    """
