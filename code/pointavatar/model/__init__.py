"""Networks, point cloud and the PointAvatar module (spec §5)."""

from pointavatar.model.compat import convert_original_state_dict, to_original_state_dict
from pointavatar.model.deformer import ForwardDeformer
from pointavatar.model.embedder import PositionalEncoding, get_embedder
from pointavatar.model.geometry import GeometryNetwork
from pointavatar.model.knn import nearest_neighbor
from pointavatar.model.outputs import EvalOutputs, PointAvatarOutputs
from pointavatar.model.point_avatar import PointAvatar, deformed_normals
from pointavatar.model.point_cloud import PointCloud
from pointavatar.model.shading import RenderingNetwork

__all__ = [
    "EvalOutputs",
    "ForwardDeformer",
    "GeometryNetwork",
    "PointAvatar",
    "PointAvatarOutputs",
    "PointCloud",
    "PositionalEncoding",
    "RenderingNetwork",
    "convert_original_state_dict",
    "deformed_normals",
    "get_embedder",
    "nearest_neighbor",
    "to_original_state_dict",
]
