"""`quantpipe compare`: a recipe's quantization side by side with the methods users compare it against, each run
by its own library on the same load artifact and measured on the same held-out tokens.

Every row is a stage (pipeline.compare.stages) run through the runner, so it is keyed over the load artifact, the
baseline's settings, the evaluation fields and the library versions, cached and locked like the pipeline's own.
A baseline that fails on this host is reported as "not run" with the library's reason, never with numbers."""
