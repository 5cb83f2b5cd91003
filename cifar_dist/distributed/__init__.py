"""Many processes: the launcher's environment, the Accelerator, collectives, exact gradient reduction."""
