"""The planner's one error type."""


class PlanError(ValueError):
    """Input the planner cannot plan for: unsupported model, bad traffic file, bad sizes."""
