from .checkpoint import check_output_dir, save_compressed
from .record import read_record

__all__ = ['check_output_dir', 'read_record', 'save_compressed']
