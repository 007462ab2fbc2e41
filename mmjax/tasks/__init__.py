"""Tasks: what an experiment trains (model + data + objective + evaluation), one file each.

The training loop reaches them by name through `mmjax.train.task.TASKS`:

  lm             causal language modelling on packed text (`mmjax.tasks.lm`)
  sft            instruction tuning of an LM on chat-templated conversations, loss on the
                 assistant's tokens (`mmjax.tasks.sft`)
"""
