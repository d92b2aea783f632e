"""The `m1` command tree, one module per group: model (`m1 convert`), data (`m1 data curate`), train
(`m1 train distill|sft1|sft2`), grpo (`m1 grpo`), evaluate (`m1 eval`, `m1 bench`), pipeline (`m1 pipeline`,
`m1 stage`, `m1 promote`). components/cli.py builds the parser from them. They sit above every library package
(they read the root config), and import a stage's module inside the command that runs it: `m1 --help` and
every other command start without loading torch, Ray or MLflow."""
