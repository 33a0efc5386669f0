"""kvship inside inference engines. :mod:`.paged` is engine-neutral (numpy only);
:mod:`.vllm` is vLLM's KV connector and the only module that imports vLLM."""
