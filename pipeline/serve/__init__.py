"""`pipeline serve`: a read-only web app over an extract output (Ray-free): search by image or id through the
index, duplicate groups, a map of clusters and the outliers, the probe and a head's metrics, the runs."""

from pipeline.serve.app import Uploads, create_app
from pipeline.serve.data import Catalog

__all__ = ["Catalog", "Uploads", "create_app"]
