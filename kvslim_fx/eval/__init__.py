"""Evaluation tooling behind ``kvslim-fx eval`` and the benchmarks, on top of the library.

``corpus`` reads Jane Austen's novels (the evaluation text); ``perplexity`` cuts them into
token windows and scores a compressed cache's continuation NLL against the uncompressed model;
``haystack`` builds needle and retrieval prompts from the same text and ``answers`` answers and
scores them; ``case_file`` writes every case as token ids for a peer harness; ``default_model``
locates (converting it once) the default SmolLM2-135M-Instruct checkpoint. The library itself
never imports this package; the command line does, lazily, inside its commands.
"""
