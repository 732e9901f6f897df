"""Model ladders the project trains itself: corpus, tokenizer, training, registered ladder configs.

`python -m pipeline.ladders <name>` trains (or lists) a ladder; `ladder.resolve_ladder` turns a
`ladder:<name>[/<size>]` reference into trained member directories.
"""
