"""Example workflows to copy: list ``examples.workflows`` in CONVEYOR_WORKFLOW_MODULES."""
