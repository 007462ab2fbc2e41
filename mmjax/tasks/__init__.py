"""Tasks: what an experiment trains (model + data + objective + evaluation), one file each.

The training loop reaches them by name through `mmjax.train.task.TASKS`:

  lm             causal language modelling on packed text (`mmjax.tasks.lm`)
"""
