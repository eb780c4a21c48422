"""The plan in force and what changes it: reloads, the background scheduler, state and audit."""
