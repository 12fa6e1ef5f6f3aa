"""The command-line tools, installed as console scripts (setup.py) and wrapped by ``tools/*.py``
for a clone:

=========================  ==================================  =========================
command                    module                              clone
=========================  ==================================  =========================
convmae-train              convmae_det.cli.train_net           tools/train_net.py
convmae-pretrain           convmae_det.cli.pretrain            tools/pretrain.py
convmae-convert            convmae_det.cli.convert_pretrain    tools/convert_pretrain.py
convmae-predict            convmae_det.cli.predict             tools/predict.py
convmae-benchmark          convmae_det.cli.benchmark           tools/benchmark.py
convmae-export             convmae_det.cli.export_model        tools/export_model.py
convmae-coco-eval-bench    convmae_det.cli.coco_eval_bench     tools/coco_eval_bench.py
convmae-seed-grid          convmae_det.cli.seed_grid           tools/seed_grid.py
convmae-make-shapes        convmae_det.cli.make_shapes_dataset tools/make_shapes_dataset.py
=========================  ==================================  =========================

Each module's ``main(argv=None)`` is the command; train_net's is ``cli(argv=None)``, its
``main(args)`` being what detectron2's ``launch`` runs in every process. ``python -m
convmae_det.cli.X`` runs them too. The commands log through :func:`convmae_det.utils.logger.setup_logging`.
"""
