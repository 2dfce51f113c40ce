from .checkpoint import check_output_dir, read_record, save_compressed

__all__ = ['check_output_dir', 'read_record', 'save_compressed']
