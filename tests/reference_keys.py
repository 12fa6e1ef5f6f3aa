"""Parameter names and shapes of the official ConvMAE-Base checkpoints (reference section 3),
written out from the reference's listing, for the encoder part used by detection; the same
names at other widths and depths for tiny stand-ins of the official files."""

C1, C2, C3 = 256, 384, 768


def _vit_block_shapes(p: str, d: int):
    """Official names of a pre-norm ViT block (timm Block) of width d under prefix p."""
    return {
        p + "norm1.weight": (d,),
        p + "norm1.bias": (d,),
        p + "attn.qkv.weight": (3 * d, d),
        p + "attn.qkv.bias": (3 * d,),
        p + "attn.proj.weight": (d, d),
        p + "attn.proj.bias": (d,),
        p + "norm2.weight": (d,),
        p + "norm2.bias": (d,),
        p + "mlp.fc1.weight": (4 * d, d),
        p + "mlp.fc1.bias": (4 * d,),
        p + "mlp.fc2.weight": (d, 4 * d),
        p + "mlp.fc2.bias": (d,),
    }


def convmae_base_encoder_shapes(include_final_norm: bool = False):
    return convmae_encoder_shapes((C1, C2, C3), (2, 2, 11), include_final_norm)


def convmae_encoder_shapes(dims, depths, include_final_norm: bool = False):
    """The official encoder's names with embed dims ``dims`` and ``depths`` blocks per stage."""
    C1, C2, C3 = dims
    shapes = {
        "pos_embed": (1, 196, C3),
        "patch_embed1.proj.weight": (C1, 3, 4, 4),
        "patch_embed1.proj.bias": (C1,),
        "patch_embed1.norm.weight": (C1,),
        "patch_embed1.norm.bias": (C1,),
        "patch_embed2.proj.weight": (C2, C1, 2, 2),
        "patch_embed2.proj.bias": (C2,),
        "patch_embed2.norm.weight": (C2,),
        "patch_embed2.norm.bias": (C2,),
        "patch_embed3.proj.weight": (C3, C2, 2, 2),
        "patch_embed3.proj.bias": (C3,),
        "patch_embed3.norm.weight": (C3,),
        "patch_embed3.norm.bias": (C3,),
        "patch_embed4.weight": (C3, C3),
        "patch_embed4.bias": (C3,),
    }
    for s, c in ((1, C1), (2, C2)):
        for n in range(depths[s - 1]):
            p = f"blocks{s}.{n}."
            shapes.update(
                {
                    p + "norm1.weight": (c,),
                    p + "norm1.bias": (c,),
                    p + "conv1.weight": (c, c, 1, 1),
                    p + "conv1.bias": (c,),
                    p + "attn.weight": (c, 1, 5, 5),
                    p + "attn.bias": (c,),
                    p + "conv2.weight": (c, c, 1, 1),
                    p + "conv2.bias": (c,),
                    p + "norm2.weight": (c,),
                    p + "norm2.bias": (c,),
                    p + "mlp.fc1.weight": (4 * c, c, 1, 1),
                    p + "mlp.fc1.bias": (4 * c,),
                    p + "mlp.fc2.weight": (c, 4 * c, 1, 1),
                    p + "mlp.fc2.bias": (c,),
                }
            )
    for n in range(depths[2]):
        shapes.update(_vit_block_shapes(f"blocks3.{n}.", C3))
    if include_final_norm:
        shapes.update({"norm.weight": (C3,), "norm.bias": (C3,)})
    return shapes


def convmae_base_pretrain_shapes():
    """The full official pretraining checkpoint: encoder, norm, fusion convs and decoder."""
    shapes = convmae_base_encoder_shapes(include_final_norm=True)
    D = 512
    shapes.update(
        {
            "mask_token": (1, 1, D),
            "decoder_pos_embed": (1, 196, D),
            "stage1_output_decode.weight": (C3, C1, 4, 4),
            "stage1_output_decode.bias": (C3,),
            "stage2_output_decode.weight": (C3, C2, 2, 2),
            "stage2_output_decode.bias": (C3,),
            "decoder_embed.weight": (D, C3),
            "decoder_embed.bias": (D,),
            "decoder_norm.weight": (D,),
            "decoder_norm.bias": (D,),
            "decoder_pred.weight": (16 * 16 * 3, D),
            "decoder_pred.bias": (16 * 16 * 3,),
        }
    )
    for n in range(8):
        shapes.update(_vit_block_shapes(f"decoder_blocks.{n}.", D))
    return shapes


def convmae_det_official_shapes(dims, depths, num_heads, window_size, global_blocks, rel_pos_grid,
                                out_channels=256, box_conv=256, box_fc=1024, mask_conv=256, num_classes=80):
    """The state dict of an official ConvMAE-Det model (OpenGVLab/Official-ConvMAE-Det,
    ``mask_rcnn_vitdet_convmae_b_25ep.py``: detectron2 main's ``common/models/mask_rcnn_vitdet.py``
    with ``model.backbone.net = ConvViT``), written out from those sources; the defaults of the
    head sizes are the official ones. Section 4 of the reference: ``backbone.net.<encoder>`` with
    the rel-pos tables, ``backbone.simfp_*``; the heads are detectron2 main's, by module name:

    - RPN: ``StandardRPNHead(conv_dims=[-1, -1])``: ``conv.conv0``, ``conv.conv1`` (3x3, bias),
      ``objectness_logits``, ``anchor_deltas`` (3 anchors per position);
    - box head: ``FastRCNNConvFCHead(conv_dims=[256] * 4, fc_dims=[1024], conv_norm="LN")``:
      ``conv1..4`` without bias, each with ``norm``, then ``fc1``; ``FastRCNNOutputLayers``:
      ``cls_score``, ``bbox_pred`` (class-specific);
    - mask head: ``MaskRCNNConvUpsampleHead(conv_dims=[256] * 5, conv_norm="LN")``:
      ``mask_fcn1..4`` with ``norm``, ``deconv``, ``predictor``.

    Not in the file: GeneralizedRCNN's pixel mean/std and the anchors (non-persistent buffers).
    """
    d, out = dims[2], out_channels
    shapes = {f"backbone.net.{k}": v for k, v in convmae_encoder_shapes(dims, depths).items()}
    head_dim = d // num_heads
    for i in range(depths[2]):
        size = rel_pos_grid if i in global_blocks else window_size
        for axis in ("h", "w"):
            shapes[f"backbone.net.blocks3.{i}.attn.rel_pos_{axis}"] = (2 * size - 1, head_dim)
    # simple feature pyramid: x4 = deconv, LN, GELU, deconv; x2 = deconv; x1 = nothing; x0.5 = max pool
    shapes.update({
        "backbone.simfp_2.0.weight": (d, d // 2, 2, 2), "backbone.simfp_2.0.bias": (d // 2,),
        "backbone.simfp_2.1.weight": (d // 2,), "backbone.simfp_2.1.bias": (d // 2,),
        "backbone.simfp_2.3.weight": (d // 2, d // 4, 2, 2), "backbone.simfp_2.3.bias": (d // 4,),
        "backbone.simfp_3.0.weight": (d, d // 2, 2, 2), "backbone.simfp_3.0.bias": (d // 2,),
    })
    # then a 1x1 conv + LN and a 3x3 conv + LN, both without bias, at these indexes
    for stage, first, cin in ((2, 4, d // 4), (3, 1, d // 2), (4, 0, d), (5, 1, d)):
        for idx, c, k in ((first, cin, 1), (first + 1, out, 3)):
            p = f"backbone.simfp_{stage}.{idx}."
            shapes.update({p + "weight": (out, c, k, k), p + "norm.weight": (out,), p + "norm.bias": (out,)})
    p, a = "proposal_generator.rpn_head.", 3
    for k in (0, 1):
        shapes.update({f"{p}conv.conv{k}.weight": (out, out, 3, 3), f"{p}conv.conv{k}.bias": (out,)})
    shapes.update({
        p + "objectness_logits.weight": (a, out, 1, 1), p + "objectness_logits.bias": (a,),
        p + "anchor_deltas.weight": (4 * a, out, 1, 1), p + "anchor_deltas.bias": (4 * a,),
    })
    p = "roi_heads.box_head."
    for k, cin in zip(range(1, 5), (out, box_conv, box_conv, box_conv)):
        shapes.update({f"{p}conv{k}.weight": (box_conv, cin, 3, 3), f"{p}conv{k}.norm.weight": (box_conv,),
                       f"{p}conv{k}.norm.bias": (box_conv,)})
    shapes.update({
        p + "fc1.weight": (box_fc, box_conv * 7 * 7), p + "fc1.bias": (box_fc,),
        "roi_heads.box_predictor.cls_score.weight": (num_classes + 1, box_fc),
        "roi_heads.box_predictor.cls_score.bias": (num_classes + 1,),
        "roi_heads.box_predictor.bbox_pred.weight": (4 * num_classes, box_fc),
        "roi_heads.box_predictor.bbox_pred.bias": (4 * num_classes,),
    })
    p = "roi_heads.mask_head."
    for k, cin in zip(range(1, 5), (out, mask_conv, mask_conv, mask_conv)):
        shapes.update({f"{p}mask_fcn{k}.weight": (mask_conv, cin, 3, 3), f"{p}mask_fcn{k}.norm.weight": (mask_conv,),
                       f"{p}mask_fcn{k}.norm.bias": (mask_conv,)})
    shapes.update({
        p + "deconv.weight": (mask_conv, mask_conv, 2, 2), p + "deconv.bias": (mask_conv,),
        p + "predictor.weight": (num_classes, mask_conv, 1, 1), p + "predictor.bias": (num_classes,),
    })
    return shapes
