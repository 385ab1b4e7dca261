"""Example workflows to copy: list ``conveyor.examples.workflows`` in CONVEYOR_WORKFLOW_MODULES."""
