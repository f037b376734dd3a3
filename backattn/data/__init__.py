"""Data: math rows to tokens (:mod:`.sft_data`), the offline GSM-Symbolic data (:mod:`.gsm_symbolic`), cached base
features (:mod:`.feature_cache`) and the atomic cache directories they share (:mod:`.cache_dirs`)."""
