"""One function per stage: extract, train-head, finetune, evaluate."""
