"""Parameter names and shapes of the official ConvMAE-Base checkpoints (reference section 3),
written out from the reference's listing, for the encoder part used by detection."""

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
        for n in range(2):
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
    for n in range(11):
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
